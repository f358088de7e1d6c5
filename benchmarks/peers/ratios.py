"""The ratios of issue 7, deliverable 2, computed from one sitting's results and marked met or not."""

from __future__ import annotations

# NOTE: bytes per weight read for one decode step: fp32; bf16; Q8_0 / int8 blocks of 32 with a 16-bit
# scale (34/32); Q4_0 / int4 blocks of 32 with a 16-bit scale (18/32). Embeddings count once (tied).
BYTES_PER_PARAM = {"fp32": 4.0, "16-bit": 2.0, "8-bit": 34 / 32, "4-bit": 18 / 32}
PRECISIONS = tuple(BYTES_PER_PARAM)


def floors_ms(num_params: int, bandwidth_gbps: float) -> dict[str, float]:
    """Weight bytes read per token / measured read bandwidth, per precision, in ms."""
    return {p: round(num_params * b / (bandwidth_gbps * 1e9) * 1e3, 3) for p, b in BYTES_PER_PARAM.items()}


def _get(system: dict, workload: str, key: str, stat: str = "p50"):
    s = system["workloads"].get(workload) or {}
    if key == "output_tok_per_s":
        return s.get(key)
    return (s.get(key) or {}).get(stat)


def _best(systems: list[dict], workload: str, key: str, higher: bool, precision: str | None = None):
    """(value, label) of the best system for workload/key, or (None, None)."""
    found = [(v, s["label"]) for s in systems if precision in (None, s["precision"])
             and (v := _get(s, workload, key)) is not None]
    if not found:
        return None, None
    return max(found) if higher else min(found)


def _row(name: str, lepton, peer, goal: float, sense: str, note: str = "") -> dict:
    """lepton / peer (value, label) pairs; ratio = lepton / peer, met when ratio `sense` goal."""
    ratio = None if lepton[0] is None or not peer[0] else lepton[0] / peer[0]
    met = None if ratio is None else (ratio >= goal if sense == ">=" else ratio <= goal)
    return {"name": name, "lepton": lepton[0], "lepton_system": lepton[1], "reference": peer[0],
            "reference_system": peer[1], "ratio": None if ratio is None else round(ratio, 3),
            "goal": f"{sense} {goal:g}", "met": met, "note": note}


def compute(result: dict) -> list[dict]:
    """Every ratio of deliverable 2 that this run's results allow."""
    systems = [s for s in result["systems"] if s.get("workloads")]
    lepton = [s for s in systems if s["peer"] == "lepton"]
    peers = [s for s in systems if s["peer"] != "lepton"]
    rate = "output_tok_per_s"
    rows = [_row("W2 output tok/s, best Lepton / best peer (any precision)",
                 _best(lepton, "w2", rate, True), _best(peers, "w2", rate, True), 1.5, ">=")]
    for p in PRECISIONS:
        rows.append(_row(f"W2 output tok/s, {p}: best Lepton / best peer", _best(lepton, "w2", rate, True, p),
                         _best(peers, "w2", rate, True, p), 1.5, ">="))
    for w in ("w1", "w2"):
        rows.append(_row(f"{w.upper()} TTFT p50, best Lepton / best peer", _best(lepton, w, "ttft_ms", False),
                         _best(peers, w, "ttft_ms", False), 1.0, "<="))
    for p in PRECISIONS:
        rows.append(_row(f"W1 ITL p50, {p}: best Lepton / best peer", _best(lepton, "w1", "itl_ms", False, p),
                         _best(peers, "w1", "itl_ms", False, p), 1.0, "<="))
    floors = result["floors_ms"]
    for s in lepton:
        floor = floors[s["precision"]]
        rows.append(_row(f"W1 ITL p50 / bandwidth floor ({s['precision']}, {floor:.2f} ms)",
                         (_get(s, "w1", "itl_ms"), s["label"]), (floor, "floor"), 1.3, "<="))
    for s in lepton:
        rows.append(_row("64 concurrent / 16 concurrent (W2) output tok/s", (_get(s, "c64", rate), s["label"]),
                         (_get(s, "w2", rate), s["label"]), 1.0, ">="))
    for s in lepton:
        if "prefix_no_caching" in s:
            off = (s["prefix_no_caching"].get("ttft_ms") or {}).get("p50")
            rows.append(_row("shared prefix TTFT p50, caching on / off", (_get(s, "prefix", "ttft_ms"), s["label"]),
                             (off, s["label"] + ", no prefix caching"), 0.1, "<="))
    for s in lepton:
        inproc = s.get("w2_in_process") or {}
        rows.append(_row("W2 output tok/s, through Triton / engine in process",
                         (_get(s, "w2", rate), s["label"]), (inproc.get(rate), s["label"] + " in process"), 0.95, ">="))
    return rows

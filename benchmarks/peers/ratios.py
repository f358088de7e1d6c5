"""The ratios of issue 7, deliverable 2, computed from one sitting's results and marked met or not."""

from __future__ import annotations

# NOTE: bytes per weight read for one decode step: fp32; bf16; Q8_0 / int8 blocks of 32 with a 16-bit
# scale (34/32); Q4_0 / int4 blocks of 32 with a 16-bit scale (18/32). Embeddings count once (tied).
BYTES_PER_PARAM = {"fp32": 4.0, "16-bit": 2.0, "8-bit": 34 / 32, "4-bit": 18 / 32}
PRECISIONS = tuple(BYTES_PER_PARAM)


def floors_ms(num_params: int, bandwidth_gbps: float) -> dict[str, float]:
    """Weight bytes read per token / measured read bandwidth, per precision, in ms."""
    return {p: round(num_params * b / (bandwidth_gbps * 1e9) * 1e3, 3) for p, b in BYTES_PER_PARAM.items()}


def system_floor(system: dict, result: dict) -> tuple[float, str]:
    """(ms, what it counts) of one system's W1 bandwidth floor: the bytes its greedy decode step's products read
    where the runner counted them (Lepton's ONNX Runtime runners, `decode_reads`: with the lm_head's 4-bit draft
    they read less than the precision's weights), else the precision's weights (floors_ms)."""
    reads = (system.get("decode_reads") or {}).get("argmax_only")
    if not reads:
        return result["floors_ms"][system["precision"]], f"{system['precision']} weights"
    bandwidth = result["probe"]["read_bandwidth_gbps"]["all_threads"]
    return round(reads / (bandwidth * 1e9) * 1e3, 3), f"{reads / 1e6:.1f} MB its greedy decode reads"


def fails_gate(system: dict) -> bool:
    """A Lepton export this sitting could only build with --no-quality-gate (its quality table misses the
    gate), or a runner setting whose quality report failed: `make serve` never serves it, so it is never the
    Lepton side of a comparison with the peers."""
    return bool(system.get("gate_failed")) or "--no-quality-gate" in (system.get("quality_gate") or "")


def _gate_note(system: dict) -> str:
    return "fails its quality gate" if fails_gate(system) else ""


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


def _versus_peers(name: str, lepton: list[dict], peers: list[dict], workload: str, key: str, higher: bool,
                  goal: float, sense: str, precision: str | None = None) -> dict:
    """Best Lepton system that passes its quality gate against the best peer; a gate-failing Lepton
    system that would have done better is named in the note, not counted."""
    counted, failing = [s for s in lepton if not fails_gate(s)], [s for s in lepton if fails_gate(s)]
    row = _row(name, _best(counted, workload, key, higher, precision), _best(peers, workload, key, higher, precision),
               goal, sense)
    value, label = _best(failing, workload, key, higher, precision)
    if value is not None and (row["lepton"] is None or (value > row["lepton"]) == higher):
        ratio = f" ({value / row['reference']:.3f})" if row["reference"] else ""
        row["note"] = f"not counted: {label}, which fails its quality gate, {value:,.2f}{ratio}"
    return row


def compute(result: dict) -> list[dict]:
    """Every ratio of deliverable 2 that this run's results allow."""
    systems = [s for s in result["systems"] if s.get("workloads")]
    lepton = [s for s in systems if s["peer"] == "lepton"]
    peers = [s for s in systems if s["peer"] != "lepton"]
    rate = "output_tok_per_s"
    rows = [_versus_peers("W2 output tok/s, best Lepton / best peer (any precision)", lepton, peers, "w2", rate,
                          True, 1.5, ">=")]
    for p in PRECISIONS:
        rows.append(_versus_peers(f"W2 output tok/s, {p}: best Lepton / best peer", lepton, peers, "w2", rate,
                                  True, 1.5, ">=", p))
    for w in ("w1", "w2"):
        rows.append(_versus_peers(f"{w.upper()} TTFT p50, best Lepton / best peer", lepton, peers, w, "ttft_ms",
                                  False, 1.0, "<="))
    for p in PRECISIONS:
        rows.append(_versus_peers(f"W1 ITL p50, {p}: best Lepton / best peer", lepton, peers, "w1", "itl_ms",
                                  False, 1.0, "<=", p))
    for s in lepton:
        floor, what = system_floor(s, result)
        row = _row(f"W1 ITL p50 / bandwidth floor ({what}, {floor:.2f} ms)", (_get(s, "w1", "itl_ms"), s["label"]),
                   (floor, "floor"), 1.3, "<=", _gate_note(s))
        weights = result["floors_ms"][s["precision"]]
        if weights != floor and row["lepton"] is not None:
            row["note"] = "; ".join(filter(None, [row["note"], f"the {s['precision']} weights' floor {weights:.2f} ms: "
                                                               f"{row['lepton'] / weights:.3f}"]))
        rows.append(row)
    for s in lepton:
        rows.append(_row("64 concurrent / 16 concurrent (W2) output tok/s", (_get(s, "c64", rate), s["label"]),
                         (_get(s, "w2", rate), s["label"]), 1.0, ">=", _gate_note(s)))
    # NOTE: cold, the 16 requests arrive together with a prefix nobody sent before: with caching the median one
    # still waits for one prefill of the prefix, without it for about 8.5 of them (1 / 8.5 = 0.118 at best);
    # cached first, the prefix was computed by a request before them, as a shared system prompt is.
    for name, title in (("prefix", "shared prefix TTFT p50, caching on / off"),
                        ("prefix_warm", "shared prefix cached first, TTFT p50, caching on / off")):
        for s in lepton:
            if f"{name}_no_caching" in s:
                off = (s[f"{name}_no_caching"].get("ttft_ms") or {}).get("p50")
                rows.append(_row(title, (_get(s, name, "ttft_ms"), s["label"]),
                                 (off, s["label"] + ", no prefix caching"), 0.1, "<=", _gate_note(s)))
    for s in lepton:
        served, inproc = triton_and_in_process(s)
        rows.append(_row("W2 output tok/s, through Triton / engine in process", (served, s["label"]),
                         (inproc, s["label"] + " in process"), 0.95, ">=", _gate_note(s)))
    for s in lepton:
        pair = s.get("w2_perf_analyzer") or {}
        if pair:  # NOTE: the same, the load sent by perf_analyzer (C++) where benchmarks.loadgen (Python) sends it above
            rows.append(_row("W2 output tok/s, through Triton (perf_analyzer's client) / engine in process",
                             ((pair.get("served") or {}).get("output_tok_per_s"), s["label"]),
                             ((pair.get("in_process") or {}).get("output_tok_per_s"), s["label"] + " in process"),
                             0.95, ">=", _gate_note(s)))
    return rows


def triton_and_in_process(system: dict) -> tuple[float | None, float | None]:
    """W2 output tok/s through Triton and in process: the means over the back-to-back pairs (`w2_pairs`), or
    the one served W2 and the one in-process run of a sitting from before the pairs."""
    pairs = system.get("w2_pairs")
    if not pairs:
        return _get(system, "w2", "output_tok_per_s"), (system.get("w2_in_process") or {}).get("output_tok_per_s")
    rates = [(p["served"].get("output_tok_per_s"), p["in_process"].get("output_tok_per_s")) for p in pairs]
    if any(a is None or b is None for a, b in rates):
        return None, None
    return sum(a for a, _ in rates) / len(rates), sum(b for _, b in rates) / len(rates)

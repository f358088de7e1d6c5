"""Per-run figures from client records: throughput, TTFT, ITL, end-to-end latency, KV occupancy."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from benchmarks.loadgen import RequestRecord
from benchmarks.metrics import KVSample

PERCENTILES = (50, 90, 99)


def percentiles(values: Sequence[float], scale: float = 1.0) -> dict[str, float | None]:
    """p50/p90/p99 and mean of values times scale (None when there are no values)."""
    if len(values) == 0:
        return {**{f"p{p}": None for p in PERCENTILES}, "mean": None, "n": 0}
    array = np.asarray(values, dtype=np.float64) * scale
    out = {f"p{p}": round(float(np.percentile(array, p)), 3) for p in PERCENTILES}
    return {**out, "mean": round(float(array.mean()), 3), "n": int(array.size)}


def inter_token_gaps(record: RequestRecord) -> list[float]:
    """Seconds per token between consecutive responses, one value per token they carried."""
    gaps = []
    for (t0, n0, _), (t1, n1, _) in zip(record.responses, record.responses[1:]):
        if n1 > n0:
            gaps.extend([(t1 - t0) / (n1 - n0)] * (n1 - n0))
    return gaps


def summarize(records: Sequence[RequestRecord], cpu: dict | None = None) -> dict:
    """Aggregate one run: rates over its wall time and latency percentiles in milliseconds."""
    ok = [r for r in records if not r.error]
    errors = sorted({r.error for r in records if r.error})
    if not ok:
        return {"num_requests": len(records), "num_errors": len(records), "errors": errors}
    start, end = min(r.sent_s for r in ok), max(r.done_s for r in ok)
    wall = end - start
    output_tokens = sum(r.num_output_tokens for r in ok)
    prompt_tokens = sum(r.num_input_tokens for r in ok)
    ttft = [r.first_token_s - r.sent_s for r in ok if r.first_token_s is not None]
    tpot = [
        (r.responses[-1][0] - r.first_token_s) / (r.num_output_tokens - r.responses[0][1])
        for r in ok if r.first_token_s is not None and r.num_output_tokens > r.responses[0][1]
    ]
    itl = [gap for r in ok for gap in inter_token_gaps(r)]
    summary = {
        "num_requests": len(records),
        "num_errors": len(records) - len(ok),
        "errors": errors[:5],
        "wall_s": round(wall, 3),
        "output_tokens": output_tokens,
        "prompt_tokens": prompt_tokens,
        "output_tok_per_s": round(output_tokens / wall, 2),
        "total_tok_per_s": round((output_tokens + prompt_tokens) / wall, 2),
        "requests_per_s": round(len(ok) / wall, 3),
        "responses_per_output_token": round(sum(len(r.responses) for r in ok) / max(output_tokens, 1), 3),
        "num_input_tokens_seen": sorted({r.num_input_tokens for r in ok})[:8],
        "finish_reasons": sorted({r.finish_reason for r in ok}),
        "ttft_ms": percentiles(ttft, 1e3),
        "itl_ms": percentiles(itl, 1e3),
        "tpot_ms": percentiles(tpot, 1e3),
        "e2e_ms": percentiles([r.done_s - r.sent_s for r in ok], 1e3),
    }
    if cpu:
        summary["cpu"] = {k: round(v, 2) for k, v in cpu.items()} | {
            "client_cores": round(cpu["client_s"] / wall, 3),
            "server_cores": round(cpu["server_s"] / wall, 3),
        }
    return summary


def kv_fragmentation(samples: Sequence[KVSample], block_size: int) -> dict:
    """KV slots held (blocks in use x block_size) over tokens stored, in steady decoding.

    Only samples where the server runs exactly the requests the client sees decoding (none
    waiting, none in prefill) are used, so both sides count the same sequences.
    """
    steady = [
        s for s in samples
        if s.num_waiting == 0 and s.num_running == s.client_in_flight == s.client_decoding > 0
        and s.client_tokens_stored > 0
    ]
    ratios = [s.kv_blocks_used * block_size / s.client_tokens_stored for s in steady]
    return {
        "num_samples": len(samples),
        "num_steady_samples": len(steady),
        "block_size": block_size,
        "slots_per_stored_token": percentiles(ratios),
        "internal_waste_fraction_p50": round(1 - 1 / float(np.median(ratios)), 4) if ratios else None,
        "max_kv_blocks_used": max((s.kv_blocks_used for s in samples), default=0),
        "max_num_running": max((s.num_running for s in samples), default=0),
        "timeline": [
            (round(s.t - samples[0].t, 3), s.kv_blocks_used, s.num_running, s.client_tokens_stored)
            for s in samples
        ],
    }

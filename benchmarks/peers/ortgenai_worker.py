"""onnxruntime-genai in process, static batches of og.Generator; runs in build/peers/venv.

    build/peers/venv/bin/python benchmarks/peers/ortgenai_worker.py JOB.json RESULT.json

JOB: {"model": dir, "workloads": [{"name", "concurrency" (null: open loop), "requests": [{"id",
"ids", "max_tokens", "arrival_s"}]}]}. RESULT: per workload, per request: sent_s, done_s and one
(time, tokens so far) per generated token, in time.perf_counter() seconds of this process.
NOTE: its continuous-batching engine needs CUDA (paged attention); on CPU a batch runs from start to
end, so a request that arrives while one runs waits for it (its wait counts in its TTFT).
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import onnxruntime_genai as og


MAX_BATCH = 32


def run_batch(model, pad_token_id: int, batch: list[dict], records: dict) -> None:
    """Left-pad the prompts to one length, generate until every request has its max_tokens."""
    width = max(len(r["ids"]) for r in batch)
    longest = max(r["max_tokens"] for r in batch)
    tokens = np.full((len(batch), width), pad_token_id, dtype=np.int32)
    for row, r in enumerate(batch):
        tokens[row, width - len(r["ids"]):] = r["ids"]
    params = og.GeneratorParams(model)
    # NOTE: min_length = max_length is ignore_eos: no sequence may stop before the batch's end.
    params.set_search_options(batch_size=len(batch), max_length=width + longest, min_length=width + longest,
                              do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(tokens)
    counts = [0] * len(batch)
    while not generator.is_done() and min(c - r["max_tokens"] for c, r in zip(counts, batch)) < 0:
        generator.generate_next_token()
        now = time.perf_counter()
        for row, r in enumerate(batch):
            if counts[row] < r["max_tokens"]:
                counts[row] += 1
                records[r["id"]]["responses"].append((now, counts[row]))
                if counts[row] == r["max_tokens"]:
                    records[r["id"]]["done_s"] = now
    for r in batch:
        records[r["id"]].setdefault("done_s", time.perf_counter())


def run_workload(model, pad_token_id: int, workload: dict, max_batch: int) -> dict:
    """Closed loop: batches of `concurrency` in order. Open loop: whatever arrived, when idle."""
    requests = workload["requests"]
    records = {r["id"]: {"responses": []} for r in requests}
    start = time.perf_counter()
    if workload["concurrency"] is not None:
        concurrency = workload["concurrency"]
        size = min(concurrency, max_batch)
        for i in range(0, len(requests), size):
            batch = requests[i:i + size]
            if i % concurrency == 0:  # NOTE: a group of `concurrency` is sent at once, whatever the batches
                sent = time.perf_counter()
            for r in batch:
                records[r["id"]]["sent_s"] = sent
            run_batch(model, pad_token_id, batch, records)
        return records
    pending = sorted(requests, key=lambda r: r["arrival_s"])
    for r in pending:
        records[r["id"]]["sent_s"] = start + r["arrival_s"]
    while pending:
        now = time.perf_counter() - start
        if pending[0]["arrival_s"] > now:
            time.sleep(pending[0]["arrival_s"] - now)
            continue
        arrived = [r for r in pending if r["arrival_s"] <= now][:max_batch]
        pending = pending[len(arrived):]
        run_batch(model, pad_token_id, arrived, records)
    return records


def main(job_file: str, result_file: str) -> int:
    job = json.loads(open(job_file).read())
    config = og.Config(job["model"])
    model = og.Model(config)
    pad_token_id = json.loads(open(job["model"] + "/genai_config.json").read())["model"]["pad_token_id"]
    warm = {"id": "warmup", "ids": job["workloads"][0]["requests"][0]["ids"][:16], "max_tokens": 4}
    run_batch(model, pad_token_id, [warm], {"warmup": {"responses": []}})
    results = {}
    for workload in job["workloads"]:
        started = time.perf_counter()
        # NOTE: onnxruntime-genai 0.18 refuses batches over 32 ("batch_size (64) must be in [1, 32]"): 64
        # concurrent requests run as two batches of 32, each request's wait counted in its TTFT.
        results[workload["name"]] = run_workload(model, pad_token_id, workload, min(job.get("max_batch", 64), MAX_BATCH))
        print(f"[ortgenai] {workload['name']}: {time.perf_counter() - started:.1f} s", flush=True)
    open(result_file, "w").write(json.dumps({"version": og.__version__, "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))

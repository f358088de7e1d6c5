"""W2 and the shared-prefix run on one in-process engine, for two engine configurations side by side.

    .venv/bin/python -m benchmarks.engine_ab --model-dir build/onnx/smollm2-q8_0 \
        --param runner=onnxruntime --param num_threads=2 --versus attention=paged --rounds 2

Each round runs "new" (the --param configuration) then "old" (the same with --versus), each in a
fresh process: 16 prompts of 128 random tokens x 128 output tokens, then 16 requests behind one
shared 1,024-token prefix (+16 tokens each, 32 output tokens), greedy, ignore_eos, on one engine
with the served settings of `benchmarks.peers` (64 sequences, 512-token steps, 1 GiB of KV pools).
Prints TTFT p50 (from adding the requests to each one's first token) and wall time of each run.
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
import time

SERVED = {"max_num_seqs": "64", "max_num_batched_tokens": "512", "kv_cache_memory_bytes": "1G"}


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks.engine_ab", description=__doc__.split("\n")[0])
    p.add_argument("--model-dir", required=True)
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="engine parameter")
    p.add_argument("--versus", required=True, metavar="KEY=VALUE", help="the second configuration's change")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def run_engine(params: dict[str, str], seed: int) -> dict[str, tuple[float, float]]:
    """workload -> (TTFT p50 s, wall s) on one engine."""
    import numpy as np

    from lepton.config import EngineConfig
    from lepton.engine import LLMEngine
    from lepton.sampling_params import SamplingParams

    engine = LLMEngine(EngineConfig.from_parameters(params))
    vocab = engine.runner.model_config.vocab_size
    rng = np.random.default_rng(seed)
    prefix = rng.integers(100, vocab - 1, 1024).tolist()
    workloads = {
        "w2": [(f"w{i}", rng.integers(100, vocab - 1, 128).tolist(), 128) for i in range(16)],
        "prefix": [(f"p{i}", prefix + rng.integers(100, vocab - 1, 16).tolist(), 32) for i in range(16)],
    }
    results = {}
    for name, requests in workloads.items():
        started, first = time.perf_counter(), {}
        for request_id, tokens, max_tokens in requests:
            engine.add_request(request_id, tokens, SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                                                  ignore_eos=True))
        while engine.has_unfinished():
            for output in engine.step():
                if output.token_ids and output.request_id not in first:
                    first[output.request_id] = time.perf_counter() - started
        results[name] = (statistics.median(first.values()), time.perf_counter() - started)
    return results


def main(argv=None) -> int:
    args = parse_args(argv)
    base = {"model_dir": args.model_dir, **SERVED, **dict(item.split("=", 1) for item in args.param)}
    key, value = args.versus.split("=", 1)
    configs = {"new": base, f"old ({args.versus})": {**base, key: value}}
    print(f"{'round':>5} {'configuration':>28} {'W2 TTFT p50':>12} {'W2 wall':>9} {'prefix TTFT p50':>16} {'prefix wall':>12}")
    for round_ in range(1, args.rounds + 1):
        for label, params in configs.items():
            # NOTE: a fresh process each: runners set process-wide thread counts and keep their memory.
            with multiprocessing.get_context("spawn").Pool(1) as pool:
                out = pool.apply(run_engine, (params, args.seed))
            print(f"{round_:>5} {label:>28} {out['w2'][0]:10.2f} s {out['w2'][1]:7.2f} s "
                  f"{out['prefix'][0]:14.2f} s {out['prefix'][1]:10.2f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

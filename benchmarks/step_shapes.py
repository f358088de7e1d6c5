"""Cost of one runner step by batch shape: decodes alone, a prefill chunk alone, and both together.

    .venv/bin/python -m benchmarks.step_shapes --decodes 32 --context 192 --prefill 128

Shapes are interleaved and each is timed `--repeats` times; the minimum is the least disturbed by
other jobs on the machine, so compare minimums (medians are printed too).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from lepton.batch import build_model_input
from lepton.config import EngineConfig
from lepton.runners import make_runner, open_folder
from lepton.sampling_params import SamplingParams
from lepton.scheduler import ScheduledSeq, SchedulerOutput
from lepton.sequence import Sequence
from lepton.server import PROJECT_ROOT


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks.step_shapes", description=__doc__.split("\n")[0])
    p.add_argument("--model-dir", type=Path, default=PROJECT_ROOT / "build/models/smollm-shape")
    p.add_argument("--decodes", type=int, default=32, help="decoding sequences in the batch")
    p.add_argument("--context", type=int, default=192, help="tokens already cached per decoding sequence")
    p.add_argument("--prefill", type=int, default=128, help="tokens of the prefill chunk")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="engine parameter")
    return p.parse_args(argv)


def make_step(num_decodes: int, context: int, prefill: int, block_size: int):
    """A scheduler output of num_decodes one-token steps and, if prefill > 0, one prompt chunk."""
    items, next_block = [], 0
    params = SamplingParams(max_tokens=1)
    rows = [(f"d{i}", context, 1) for i in range(num_decodes)] + ([("p", 0, prefill)] if prefill else [])
    for request_id, num_computed, num_new in rows:
        total = num_computed + num_new
        seq = Sequence(request_id, [7] * total, params, max_total_tokens=1 << 20)
        num_blocks = -(-total // block_size)
        table = list(range(next_block, next_block + num_blocks))
        next_block += num_blocks
        items.append(ScheduledSeq(seq, num_computed, num_new, table, sample=True))
    return SchedulerOutput(items, sum(n for _, _, n in rows))


def main(argv=None) -> int:
    args = parse_args(argv)
    params = {"model_dir": str(args.model_dir), "kv_cache_memory_bytes": "1G", **dict(
        item.split("=", 1) for item in args.param)}
    config = EngineConfig.from_parameters(params)
    runner = make_runner(open_folder(config), config)
    bs = config.cache.block_size
    shapes = {
        f"{args.decodes} decodes": make_step(args.decodes, args.context, 0, bs),
        f"1 prefill x {args.prefill}": make_step(0, args.context, args.prefill, bs),
        f"{args.decodes} decodes + 1 prefill x {args.prefill}": make_step(args.decodes, args.context, args.prefill, bs),
    }
    inputs = {name: build_model_input(step, bs) for name, step in shapes.items()}
    times: dict[str, list[float]] = {name: [] for name in shapes}
    for name in shapes:  # NOTE: warm-up, one of each shape
        runner.execute(inputs[name])
    for _ in range(args.repeats):
        for name, batch in inputs.items():
            start = time.perf_counter()
            runner.execute(batch)
            times[name].append((time.perf_counter() - start) * 1e3)
    for name, values in times.items():
        print(f"{name:>40}: min {min(values):8.1f} ms   median {statistics.median(values):8.1f} ms")
    decode, prefill, mixed = (min(v) for v in times.values())
    print(f"mixed / (decodes + prefill) = {mixed / (decode + prefill):.2f} (1.0 = no cost from mixing)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Cost of one runner step by batch shape: 1 decode, N decodes, a prefill chunk, and decodes + chunk together.

    .venv/bin/python -m benchmarks.step_shapes --decodes 16 --context 192 --prefill 128 \
        --param runner=onnxruntime --model-dir build/onnx/smollm-shape-int8 [--baseline-dir OLD_EXPORT]

Shapes (and, with --baseline-dir or --versus, the two configurations) are interleaved and each is
timed `--repeats` times, so both see the same machine; medians are the figures to quote (minimums are
printed too). Every (configuration, shape) has a runner of its own, so each steps the way a server in
that shape would (attention=slots keeps decode rows in its lowest slots; one runner stepping through
all shapes in turn would move rows between slots every step).
--baseline-dir runs a second export folder the way the runner ran every step before mixed steps
were split: the whole batch as one graph run (`OnnxRunner.run`). --versus KEY=VALUE runs the same
model with one engine parameter changed (e.g. attention=paged).
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
    p.add_argument("--baseline-dir", type=Path, default=None,
                   help="an older export folder to time side by side (onnxruntime only), one graph run per step")
    p.add_argument("--versus", default=None, metavar="KEY=VALUE",
                   help="time a second configuration side by side: these parameters with KEY=VALUE")
    p.add_argument("--decodes", type=int, default=32, help="decoding sequences in the batch")
    p.add_argument("--context", type=int, default=192, help="tokens already cached per decoding sequence")
    p.add_argument("--prefill", type=int, default=128, help="tokens of the prefill chunk")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="engine parameter")
    p.add_argument("--sampled", action="store_true",
                   help="rows sampled at temperature 1 (the whole lm_head read); default greedy, as the served "
                        "workloads of docs/benchmarks.md (a draft head's steps: lepton/runners/draft_head.py)")
    p.add_argument("--ort-profile", action="store_true",
                   help="onnxruntime: also print where each shape's step time goes, by kind of graph op")
    return p.parse_args(argv)


def make_step(num_decodes: int, context: int, prefill: int, block_size: int, greedy: bool = True):
    """A scheduler output of num_decodes one-token steps and, if prefill > 0, one prompt chunk (rows greedy, or
    sampled at temperature 1)."""
    items, next_block = [], 0
    params = SamplingParams(max_tokens=1, temperature=0.0 if greedy else 1.0)
    rows = [(f"d{i}", context, 1) for i in range(num_decodes)] + ([("p", 0, prefill)] if prefill else [])
    for request_id, num_computed, num_new in rows:
        total = num_computed + num_new
        seq = Sequence(request_id, [7] * total, params, max_total_tokens=1 << 20)
        num_blocks = -(-total // block_size)
        table = list(range(next_block, next_block + num_blocks))
        next_block += num_blocks
        items.append(ScheduledSeq(seq, num_computed, num_new, table, sample=True))
    return SchedulerOutput(items, sum(n for _, _, n in rows))


def step_functions(args, params: dict[str, str], shapes: list[str]) -> dict[tuple[str, str], tuple[object, int]]:
    """(label, shape) -> (one-step function of a ModelInput, block size): a runner of its own for each shape,
    "new" from params, and "old" from --baseline-dir or --versus if asked."""
    configs = {"new": EngineConfig.from_parameters(params)}
    if args.baseline_dir is not None:
        configs = {"old": EngineConfig.from_parameters({**params, "model_dir": str(args.baseline_dir)}), **configs}
    elif args.versus is not None:
        key, value = args.versus.split("=", 1)
        configs = {"old": EngineConfig.from_parameters({**params, key: value}), **configs}
    functions = {}
    for label, config in configs.items():
        for shape in shapes:
            runner = make_runner(open_folder(config), config)
            _check_pools(runner, args, config)
            whole = args.baseline_dir is not None and label == "old"
            functions[label, shape] = (_whole_batch(runner) if whole else runner.execute, config.cache.block_size)
    return functions


def _check_pools(runner, args, config: EngineConfig) -> None:
    """The largest step (all decodes and the chunk) must fit the runner's block pools: a clear error, not an
    IndexError from deep in a runner."""
    size = config.cache.block_size
    needed = args.decodes * -(-(args.context + 1) // size) + -(-args.prefill // size)
    if needed > runner.num_blocks:
        raise SystemExit(f"step_shapes: {args.decodes} decodes over {args.context} cached tokens and a "
                         f"{args.prefill}-token chunk need {needed} blocks of {size} tokens; the pools hold "
                         f"{runner.num_blocks} (kv_cache_memory_bytes {config.cache.kv_cache_memory_bytes}): "
                         f"raise --param kv_cache_memory_bytes")


def _whole_batch(runner):
    """The step as one graph run, not split by query length (how OnnxRunner ran before)."""
    return lambda batch: runner.run(batch)[0]


def main(argv=None) -> int:
    args = parse_args(argv)
    # NOTE: a runner per (configuration, shape): 256M of pools each holds 16 x 192 tokens of SmolLM2 twice over.
    params = {"model_dir": str(args.model_dir), "kv_cache_memory_bytes": "256M", **dict(
        item.split("=", 1) for item in args.param)}
    shapes = {
        "1 decode": (1, 0),
        f"{args.decodes} decodes": (args.decodes, 0),
        f"1 prefill x {args.prefill}": (0, args.prefill),
        f"{args.decodes} decodes + 1 prefill x {args.prefill}": (args.decodes, args.prefill),
    }
    functions = step_functions(args, params, list(shapes))
    labels = list(dict.fromkeys(label for label, _ in functions))
    cases = {(label, shape): (fn, build_model_input(make_step(shapes[shape][0], args.context, shapes[shape][1], bs,
                                                               greedy=not args.sampled), bs))
             for (label, shape), (fn, bs) in functions.items()}
    times: dict[tuple[str, str], list[float]] = {key: [] for key in cases}
    for fn, batch in cases.values():  # NOTE: warm-up, one of each
        fn(batch)
    for _ in range(args.repeats):
        for key, (fn, batch) in cases.items():
            start = time.perf_counter()
            fn(batch)
            times[key].append((time.perf_counter() - start) * 1e3)
    medians = {key: statistics.median(values) for key, values in times.items()}
    if args.versus:
        print(f"old = {args.versus}")
    print(f"{'shape':>36} " + "".join(f"{label + ' median':>14}{label + ' min':>11}" for label in labels)
          + ("   new/old" if len(labels) > 1 else ""))
    for shape in shapes:
        row = "".join(f"{medians[label, shape]:11.1f} ms{min(times[label, shape]):8.1f} ms" for label in labels)
        ratio = f"{medians['new', shape] / medians['old', shape]:10.2f}" if len(labels) > 1 else ""
        print(f"{shape:>36} {row}{ratio}")
    names = list(shapes)
    for label in labels:
        decode, prefill, mixed = (medians[label, name] for name in names[1:])
        print(f"{label}: mixed / (decodes + prefill) = {mixed / (decode + prefill):.2f} (1.0 = no cost from mixing)")
    if args.ort_profile:
        print_breakdown(params, {shape: cases["new", shape][1] for shape in shapes}, args.repeats)
    return 0


# NOTE: op types by what they compute. Weight products are Gemm (float32, dynamo) or the quantized ops;
# MatMul is then attention's two products (in a torchscript float32 graph it counts weights too).
OP_KINDS = {
    "weight GEMMs": ("DynamicQuantizeMatMul", "MatMulInteger", "DynamicQuantizeLinear", "MatMulNBits", "MatMulQ8",
                     "MatMulQ4", "MatMulBF16", "MatMulF32", "Gemm", "MatMulIntegerToFloat"),
    "attention": ("MatMul", "FusedMatMul", "Softmax", "Einsum", "GroupQueryAttention", "SlotAttention", "SlotAttentionF16",
                  "SlotAttentionI8"),
    "K/V gathers, index": ("Gather", "GatherND", "GatherElements", "ScatterND", "Concat", "Where",
                           "Expand", "Slice", "Range", "Less", "LessOrEqual", "And", "Not"),
}


def print_breakdown(params: dict[str, str], batches: dict, repeats: int) -> None:
    """Each shape's median step split into graph op kinds and what happens outside the graph (Python,
    binding, K/V pool writes); from ONNX Runtime's own op profile of a second runner."""
    import collections
    import json
    import tempfile

    from lepton.runners import make_runner
    from lepton.runners.onnx_runner import split_by_query_len
    from lepton.runners.slot_runner import SlotRunner

    config = EngineConfig.from_parameters(params)
    prefix = tempfile.mkdtemp(prefix="lepton-ortprof-") + "/step"
    runner_class = type(make_runner(open_folder(config), config))  # NOTE: the attention parameter: slots or paged
    runner = runner_class(open_folder(config), config, profile_prefix=prefix)
    walls = {}
    for shape, batch in batches.items():
        runner.execute(batch)
        walls[shape] = []
        for _ in range(repeats):
            start = time.perf_counter()
            runner.execute(batch)
            walls[shape].append((time.perf_counter() - start) * 1e3)
    events = json.load(open(runner.session.end_profiling()))
    runs = [e for e in events if e.get("name") == "model_run"]
    nodes = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    kind_of = {op: kind for kind, ops in OP_KINDS.items() for op in ops}
    if runner_class is SlotRunner:  # NOTE: attention is one fused op (GroupQueryAttention or SlotAttention); a MatMul is a float32 weight
        kind_of["MatMul"] = "weight GEMMs"
    first = 0
    print(f"\nwhere the time goes (ms, the median of {repeats} steps; ORT op profile, profiling on):")
    print(f"{'shape':>36} {'step':>7} {'graph':>7} " + "".join(f"{k:>20}" for k in OP_KINDS)
          + f"{'other ops':>10}{'outside graph':>14}")
    for shape, batch in batches.items():
        if runner_class is SlotRunner:  # NOTE: the decode rows in one run, each longer row in one of its own
            per_step = int((batch.query_lens == 1).any()) + int((batch.query_lens > 1).sum())
        else:  # NOTE: a mixed step is two runs
            per_step = len(split_by_query_len(batch, config.cache.block_size))
        steps = []  # (wall, graph, op kinds) of each timed step; the first step warmed up
        for i, wall in enumerate(walls[shape], start=1):
            spans = [(r["ts"], r["ts"] + r["dur"]) for r in runs[first + i * per_step: first + (i + 1) * per_step]]
            kinds = collections.Counter()
            for e in nodes:
                # NOTE: an If's time is its branch's, whose nodes ONNX Runtime profiles one by one as well
                if e["args"].get("op_name") != "If" and any(lo <= e["ts"] <= hi for lo, hi in spans):
                    kinds[kind_of.get(e["args"].get("op_name"), "other ops")] += e["dur"] / 1e3
            steps.append((wall, sum(hi - lo for lo, hi in spans) / 1e3, kinds))
        first += (repeats + 1) * per_step
        wall, graph, kinds = sorted(steps, key=lambda step: step[0])[len(steps) // 2]  # NOTE: the median step
        print(f"{shape:>36} {wall:7.1f} {graph:7.1f} " + "".join(f"{kinds[k]:20.1f}" for k in OP_KINDS)
              + f"{kinds['other ops']:10.1f}{wall - graph:14.1f}")


if __name__ == "__main__":
    sys.exit(main())

"""Where an engine step's time goes: LLMEngine in-process (no Triton), step timings and a profile.

    .venv/bin/python -m benchmarks.profile_engine --requests 64 --output-tokens 16
    .venv/bin/python -m benchmarks.profile_engine --versus deterministic=true   # a setting's cost, side by side
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from collections import defaultdict
from pathlib import Path

import tokenizers

from benchmarks.workload import PromptFactory, fixed_requests
from lepton.config import EngineConfig
from lepton.engine import LLMEngine
from lepton.sampling_params import SamplingParams
from lepton.server import PROJECT_ROOT


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks.profile_engine", description=__doc__.split("\n")[0])
    p.add_argument("--model-dir", type=Path, default=PROJECT_ROOT / "build/models/smollm-shape")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--output-tokens", type=int, default=16)
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="engine parameter")
    p.add_argument("--arrivals-per-step", type=int, default=0,
                   help="add this many requests before each step (as a server sees requests a few ms apart); "
                        "0 = all at once")
    p.add_argument("--cprofile", action="store_true", help="also print the top functions by cumulative time")
    p.add_argument("--torch-profile", action="store_true", help="also print the top torch ops of the run")
    p.add_argument("--versus", action="append", default=[], metavar="KEY=VALUE",
                   help="compare with these engine parameters added: two engines in this process run the same "
                        "requests in turn, --rounds times, and the ratio of their median tok/s is printed")
    p.add_argument("--rounds", type=int, default=3, help="rounds of a --versus comparison (default 3)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    params = {"kv_cache_memory_bytes": "1G", "max_num_seqs": "64", "max_num_batched_tokens": "512"}
    params |= dict(item.split("=", 1) for item in args.param)
    tokenizer = tokenizers.Tokenizer.from_file(str(args.model_dir / "tokenizer.json"))
    if args.versus:
        return compare(args, tokenizer, params, params | dict(item.split("=", 1) for item in args.versus))
    factory = PromptFactory(tokenizer, 0)
    engine = warm_engine(args.model_dir, params, factory)
    pending = list(fixed_requests(factory, "p", args.requests, args.prompt_tokens, args.output_tokens))
    profiler = cProfile.Profile() if args.cprofile else None
    torch_prof = _torch_profiler() if args.torch_profile else None
    with torch_prof or _null():
        wall, steps, kinds = run_requests(engine, pending, args, profiler)
    total_out = args.requests * args.output_tokens
    print(f"{args.requests} requests x {args.output_tokens} tokens: {wall:.2f} s, {total_out / wall:.1f} out tok/s, "
          f"{len(steps)} steps")
    for kind, times in kinds.items():
        times = sorted(times)
        print(f"  {kind}: {len(times)} steps, median {times[len(times) // 2] * 1e3:.1f} ms, "
              f"max {times[-1] * 1e3:.1f} ms")
    if profiler:
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(25)
        print(out.getvalue())
    if torch_prof:
        print(torch_prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
    return 0


def warm_engine(model_dir: Path, params: dict[str, str], factory: PromptFactory) -> LLMEngine:
    """An engine on model_dir that has run two short requests (their prompts from factory)."""
    engine = LLMEngine(EngineConfig.from_parameters({"model_dir": str(model_dir), **params}))
    sampling = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    for spec in fixed_requests(factory, "warm", 2, 32, 4):
        engine.add_request(spec.request_id, spec.prompt, sampling)
    while engine.has_unfinished():
        engine.step()
    return engine


def run_requests(engine: LLMEngine, pending: list, args, profiler=None):
    """Add the requests (all at once, or --arrivals-per-step a step) and step to the end: (wall, steps, kinds)."""
    sampling = SamplingParams(max_tokens=args.output_tokens, temperature=0.0, ignore_eos=True)
    pending = list(pending)
    per_step = args.arrivals_per_step or len(pending)
    steps, kinds = [], defaultdict(list)
    started = time.perf_counter()
    while pending or engine.has_unfinished():
        for spec in pending[:per_step]:
            engine.add_request(spec.request_id, spec.prompt, sampling)
        del pending[:per_step]
        sched_len = len(engine.scheduler.running) + engine.scheduler.num_waiting
        t0 = time.perf_counter()
        if profiler:
            profiler.enable()
        outputs = engine.step()
        if profiler:
            profiler.disable()
        dt = time.perf_counter() - t0
        steps.append((dt, len(outputs), sched_len))
        kinds["decode" if engine.scheduler.num_waiting == 0 and all(
            s.num_output_tokens > 1 for s in engine.scheduler.running) else "mixed/prefill"].append(dt)
    return time.perf_counter() - started, steps, kinds


def compare(args, tokenizer, base: dict[str, str], variant: dict[str, str]) -> int:
    """The same requests on two engines in turn, --rounds times; each round has fresh prompts."""
    label = " ".join(args.versus)
    engines = {name: warm_engine(args.model_dir, params, PromptFactory(tokenizer, 0))
               for name, params in (("base", base), (label, variant))}
    rates: dict[str, list[float]] = {name: [] for name in engines}
    for round_ in range(args.rounds):
        # NOTE: new prompts each round, so no round is served from an earlier round's prefix cache.
        pending = fixed_requests(PromptFactory(tokenizer, 1 + round_), f"r{round_}", args.requests,
                                 args.prompt_tokens, args.output_tokens)
        for name, engine in engines.items():
            wall, steps, _ = run_requests(engine, pending, args)
            rates[name].append(args.requests * args.output_tokens / wall)
            print(f"round {round_ + 1} {name}: {rates[name][-1]:.1f} out tok/s ({len(steps)} steps)", flush=True)
    medians = {name: sorted(values)[len(values) // 2] for name, values in rates.items()}
    print(f"{args.requests} requests x {args.prompt_tokens} prompt + {args.output_tokens} output tokens, "
          f"median of {args.rounds} rounds: base {medians['base']:.1f} out tok/s, {label} {medians[label]:.1f} "
          f"out tok/s, ratio {medians[label] / medians['base']:.3f}")
    return 0


def _torch_profiler():
    from torch.profiler import ProfilerActivity, profile

    return profile(activities=[ProfilerActivity.CPU])


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return None


if __name__ == "__main__":
    sys.exit(main())

"""Serving benchmark: Lepton behind a real tritonserver (gRPC streaming) vs transformers generate.

    .venv/bin/python -m benchmarks.serving            # full run, writes docs/benchmarks-serving.md
    .venv/bin/python -m benchmarks.serving --quick    # smoke run, writes under build/bench/serving/
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import shlex
import socket
import sys
import time
from pathlib import Path

import tokenizers

from benchmarks import report
from benchmarks.baseline import run_baseline
from benchmarks.loadgen import InFlight, closed_loop, open_loop
from benchmarks.machine import code_version, machine_info, process_tree_cpu_s, read_bandwidth_gbps
from benchmarks.metrics import MetricsSampler
from benchmarks.model import SmolLMShape, build_model, weight_bytes
from benchmarks.stats import kv_fragmentation, summarize
from benchmarks.workload import (
    PromptFactory, RequestSpec, fixed_requests, poisson_requests, shared_prefix_requests,
)
from client.metrics import scrape
from lepton.server import PROJECT_ROOT, ServerOptions, TritonServer

BUILD_DIR = PROJECT_ROOT / "build" / "bench" / "serving"


def _lengths(text: str) -> tuple[int, int]:
    low, _, high = text.partition(":")
    return int(low), int(high or low)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.serving", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="short smoke run; results go under build/bench/serving/")
    p.add_argument("--model-dir", type=Path, default=PROJECT_ROOT / "build/models/smollm-shape",
                   help="built here once (SmolLM-135M shape, seeded random weights)")
    p.add_argument("--demo-dir", type=Path, default=PROJECT_ROOT / "build/models/demo", help="tokenizer source")
    g = p.add_argument_group("closed-loop runs")
    g.add_argument("--concurrency", default="1,4,16,64", help="comma-separated levels")
    g.add_argument("--requests-factor", type=int, default=2, help="requests per level = max(factor*c, min)")
    g.add_argument("--min-requests", type=int, default=8)
    g.add_argument("--prompt-tokens", type=int, default=128)
    g.add_argument("--output-tokens", type=int, default=128)
    g.add_argument("--metrics-interval", type=float, default=0.1, help="KV gauge sampling at the top level (s)")
    g = p.add_argument_group("engine parameters (config.pbtxt)")
    g.add_argument("--max-num-seqs", type=int, default=64)
    g.add_argument("--max-num-batched-tokens", type=int, default=512)
    g.add_argument("--kv-cache-memory-bytes", default="1G", help="1G holds ~23k tokens of this model")
    g.add_argument("--block-size", type=int, default=16)
    g.add_argument("--num-threads", type=int, default=0, help="engine intra-op threads; 0 = all cores but one")
    g = p.add_argument_group("staggered (Poisson) run")
    g.add_argument("--poisson-requests", type=int, default=32)
    g.add_argument("--poisson-rate", type=float, default=0.5, help="arrivals per second")
    g.add_argument("--poisson-prompt", type=_lengths, default="32:512", help="uniform range of prompt tokens")
    g.add_argument("--poisson-output", type=_lengths, default="16:256", help="uniform range of output tokens")
    g = p.add_argument_group("shared-prefix run")
    g.add_argument("--prefix-requests", type=int, default=16)
    g.add_argument("--prefix-tokens", type=int, default=1024)
    g.add_argument("--prefix-suffix-tokens", type=int, default=16)
    g.add_argument("--prefix-output-tokens", type=int, default=32)
    g = p.add_argument_group("outputs")
    g.add_argument("--skip-baseline", action="store_true")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--json", type=Path, help="default: benchmarks/results/serving.json (quick: build/bench/serving/)")
    g.add_argument("--doc", type=Path, help="default: docs/benchmarks-serving.md (quick: build/bench/serving/)")
    g.add_argument("--img-dir", type=Path, help="default: docs/img (quick: build/bench/serving/img)")
    g.add_argument("--from-json", type=Path, metavar="JSON",
                   help="measure nothing: redraw the plots and the markdown from an earlier run's JSON")
    # NOTE: --quick changes defaults only, so flags given with it still win.
    if p.parse_known_args(argv)[0].quick:
        p.set_defaults(requests_factor=1, min_requests=2, output_tokens=16, poisson_requests=6,
                       poisson_rate=2.0, poisson_output="8:32", prefix_requests=4, prefix_tokens=256,
                       prefix_output_tokens=8)
    args = p.parse_args(argv)
    root = BUILD_DIR if args.quick else PROJECT_ROOT
    args.json = args.json or (BUILD_DIR / "serving-quick.json" if args.quick else root / "benchmarks/results/serving.json")
    args.doc = args.doc or (BUILD_DIR / "benchmarks-quick.md" if args.quick else root / "docs/benchmarks-serving.md")
    args.img_dir = args.img_dir or (BUILD_DIR / "img" if args.quick else root / "docs/img")
    args.levels = [int(c) for c in args.concurrency.split(",")]
    return args


def engine_parameters(args, enable_prefix_caching: bool = True) -> dict[str, str]:
    return {
        "max_num_seqs": str(args.max_num_seqs),
        "max_num_batched_tokens": str(args.max_num_batched_tokens),
        "kv_cache_memory_bytes": str(args.kv_cache_memory_bytes),
        "block_size": str(args.block_size),
        "num_threads": str(args.num_threads),
        "enable_prefix_caching": str(enable_prefix_caching).lower(),
    }


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(args, name: str, params: dict[str, str]) -> TritonServer:
    """A tritonserver on free loopback ports, warmed up with a few short requests."""
    work_dir = BUILD_DIR / "triton" / name
    work_dir.mkdir(parents=True, exist_ok=True)
    options = ServerOptions(model_dir=args.model_dir, http_port=_free_port(), grpc_port=_free_port(),
                            metrics_port=_free_port(), engine_parameters=params, work_dir=work_dir)
    server = TritonServer(options, log_file=work_dir / "tritonserver.log")
    started = time.monotonic()
    server.start(timeout=300)
    log(f"[{name}] tritonserver ready in {time.monotonic() - started:.1f} s ({server.grpc_url}), log {server.log_file}")
    # NOTE: the engine may change between server starts of one run; record what each one loaded.
    args.servers.append({"name": name, "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                         "code": code_version(PROJECT_ROOT)})
    warm = fixed_requests(args.factory, f"warmup-{name}", 4, 32, 8)
    records = asyncio.run(closed_loop(server.grpc_url, warm, 4, InFlight()))
    if any(r.error for r in records):
        server.stop()
        raise RuntimeError(f"warm-up failed: {records[0].error}; see {server.log_file}")
    return server


def measure(server: TritonServer, run) -> dict:
    """Run a coroutine factory against server; summary with client and server CPU seconds."""
    client0, server0 = time.process_time(), process_tree_cpu_s(server.process.pid)
    records = asyncio.run(run())
    cpu = {"client_s": time.process_time() - client0, "server_s": process_tree_cpu_s(server.process.pid) - server0}
    # NOTE: the machine is shared; the load average tells how much others ran alongside.
    return summarize(records, cpu) | {"loadavg_after": os.getloadavg()}


def level_requests(args) -> dict[int, list[RequestSpec]]:
    """The closed-loop requests of each concurrency level: max(factor * c, min) distinct prompts."""
    return {
        c: fixed_requests(args.factory, f"c{c}", max(args.requests_factor * c, args.min_requests),
                          args.prompt_tokens, args.output_tokens)
        for c in args.levels
    }


def run_closed_loop_levels(args, server: TritonServer, levels: dict[int, list[RequestSpec]]) -> tuple[dict, dict]:
    """Each level in turn; the KV gauges are sampled during the highest one."""
    results, fragmentation = {}, {}
    for c, specs in levels.items():
        inflight = InFlight()
        sampler = MetricsSampler(server.metrics_url, inflight, args.metrics_interval) if c == max(levels) else None
        with sampler or contextlib.nullcontext():
            results[str(c)] = measure(server, lambda: closed_loop(server.grpc_url, specs, c, inflight))
        if sampler is not None:
            fragmentation = kv_fragmentation(sampler.samples, args.block_size) | {"concurrency": c}
        log(f"[lepton] c={c}: " + report.one_line(results[str(c)]))
    return results, fragmentation


def run_poisson(server: TritonServer, specs: list[RequestSpec]) -> dict:
    summary = measure(server, lambda: open_loop(server.grpc_url, specs, InFlight()))
    log("[lepton] poisson: " + report.one_line(summary))
    return summary


def run_prefix(args, specs: list[RequestSpec], enable: bool) -> dict:
    """All specs at once on a fresh server with prefix caching on or off; counter deltas included."""
    name = f"prefix-{'on' if enable else 'off'}"
    server = start_server(args, name, engine_parameters(args, enable))
    try:
        before = scrape(server.metrics_url)
        summary = measure(server, lambda: closed_loop(server.grpc_url, specs, len(specs), InFlight()))
        time.sleep(0.3)  # NOTE: the engine publishes its idle snapshot right after the last step
        after = scrape(server.metrics_url)
    finally:
        server.stop()
    names = ("lepton_prefix_cache_hits_total", "lepton_prefix_cache_queries_total", "lepton_prompt_tokens_total")
    summary["metrics_delta"] = {k: after.get(k, 0) - before.get(k, 0) for k in names}
    summary["metrics_after"] = {k: v for k, v in after.items() if k.startswith("lepton_kv")}
    log(f"[lepton] {name}: " + report.one_line(summary) + f" metrics {summary['metrics_delta']}")
    return summary


def log(message: str) -> None:
    print(f"{datetime.datetime.now():%H:%M:%S} {message}", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.from_json:
        return write_outputs(args, json.loads(args.from_json.read_text()), write_json=False)
    words = ["python", "-m", "benchmarks.serving", *(sys.argv[1:] if argv is None else argv)]
    command = " ".join(shlex.quote(w) for w in words)
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    started = datetime.datetime.now().astimezone()
    log(f"building / reusing {args.model_dir}")
    build_model(args.model_dir, args.demo_dir)
    tokenizer = tokenizers.Tokenizer.from_file(str(args.model_dir / "tokenizer.json"))
    args.factory = PromptFactory(tokenizer, args.seed)
    args.servers = []
    machine = machine_info() | {"read_bandwidth_gbps": read_bandwidth_gbps()}
    log(f"machine: {machine}")
    result = {
        "command": command, "date": started.isoformat(timespec="seconds"), "machine": machine,
        "model": {"dir": str(args.model_dir), "shape": SmolLMShape().__dict__, "weight_bytes": weight_bytes(args.model_dir)},
        "parameters": {k: v for k, v in vars(args).items() if k not in ("factory", "servers")}
        | {"engine": engine_parameters(args)},
        "servers": args.servers,
    }
    levels = level_requests(args)
    poisson = poisson_requests(args.factory, args.poisson_requests, args.poisson_rate,
                               args.poisson_prompt, args.poisson_output, args.seed)
    prefix = shared_prefix_requests(args.factory, args.prefix_requests, args.prefix_tokens,
                                    args.prefix_suffix_tokens, args.prefix_output_tokens)
    if not args.skip_baseline:
        client0 = time.process_time()
        records = run_baseline(args.model_dir, levels[min(levels)], tokenizer, args.num_threads)
        result["baseline_hf"] = summarize(records, {"client_s": time.process_time() - client0, "server_s": 0.0})
        log("[hf generate] c=1: " + report.one_line(result["baseline_hf"]))
    server = start_server(args, "main", engine_parameters(args))
    try:
        result["closed_loop"], result["kv_fragmentation"] = run_closed_loop_levels(args, server, levels)
        result["poisson"] = run_poisson(server, poisson)
    finally:
        server.stop()
    result["prefix_caching"] = {"on": run_prefix(args, prefix, True), "off": run_prefix(args, prefix, False)}
    result["finished"] = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    result["machine"]["loadavg_at_end"] = os.getloadavg()
    return write_outputs(args, result, write_json=True)


def write_outputs(args, result: dict, write_json: bool) -> int:
    """The bar, the JSON, the plots and the markdown report of a result."""
    result["bar"] = report.bar(result)
    if write_json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1, default=str) + "\n")
    images = report.plots(result, args.img_dir)
    markdown = report.markdown(result, images, args.doc.parent)
    args.doc.parent.mkdir(parents=True, exist_ok=True)
    args.doc.write_text(markdown)
    print(markdown)
    written = ([str(args.json)] if write_json else []) + [str(args.doc)] + [str(i) for i in images]
    log(f"wrote {', '.join(written)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

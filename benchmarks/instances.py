"""Engine instances: N instances with a core each vs one instance with all cores, same workload.

    .venv/bin/python -m benchmarks.instances            # full run, writes docs/benchmarks-instances.md
    .venv/bin/python -m benchmarks.instances --quick    # smoke run, writes under build/bench/instances/

Each configuration gets a fresh tritonserver; the configurations run alternately, round after round
(the order reversed every other round), so that a neighbour's load hits them alike; compare the
ratios of one round, not figures across rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import shlex
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import tokenizers

from benchmarks import report
from benchmarks.loadgen import InFlight, closed_loop
from benchmarks.machine import machine_info
from benchmarks.serving import measure
from benchmarks.workload import PromptFactory, fixed_requests
from client.metrics import scrape_engines
from lepton.server import PROJECT_ROOT, ServerOptions, TritonServer

BUILD_DIR = PROJECT_ROOT / "build" / "bench" / "instances"
MODELS = {  # name: (folder, runner)
    "demo": (PROJECT_ROOT / "build/models/demo", "torch"),
    "smollm2-onnx": (PROJECT_ROOT / "build/onnx/smollm2", "onnxruntime"),
}


@dataclass(frozen=True)
class Setup:
    """One server configuration under test."""

    name: str
    instances: int
    num_threads: int  # per instance; 0 = its cores (N > 1) or all cores but one (N = 1)


SETUPS = (Setup("2 instances x 1 thread", 2, 0), Setup("1 instance x 2 threads", 1, 2),
          Setup("1 instance x 1 thread", 1, 1))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.instances", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="short smoke run; results go under build/bench/instances/")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    p.add_argument("--setups", default=",".join(str(i) for i in range(len(SETUPS))),
                   help="comma-separated indices of: " + "; ".join(f"{i}: {s.name}" for i, s in enumerate(SETUPS)))
    p.add_argument("--concurrency", default="16,64", help="comma-separated closed-loop levels")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--requests-factor", type=int, default=2, help="requests per level = factor * concurrency")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--output-tokens", type=int, default=128)
    p.add_argument("--kv-cache-memory-bytes", default="1G", help="the server's; instances split it")
    p.add_argument("--max-num-seqs", type=int, default=64, help="per engine instance")
    p.add_argument("--json", type=Path, help="default: benchmarks/results/instances.json (quick: build/bench/instances/)")
    p.add_argument("--doc", type=Path, help="default: docs/benchmarks-instances.md (quick: build/bench/instances/)")
    p.add_argument("--from-json", type=Path, metavar="JSON", help="measure nothing: write the markdown of an earlier run")
    if p.parse_known_args(argv)[0].quick:
        p.set_defaults(concurrency="4", rounds=1, requests_factor=1, output_tokens=8, models="demo", setups="0,1")
    args = p.parse_args(argv)
    args.json = args.json or (BUILD_DIR / "instances.json" if args.quick else PROJECT_ROOT / "benchmarks/results/instances.json")
    args.doc = args.doc or (BUILD_DIR / "benchmarks-instances.md" if args.quick else PROJECT_ROOT / "docs/benchmarks-instances.md")
    args.levels = [int(c) for c in args.concurrency.split(",")]
    args.setups = [SETUPS[int(i)] for i in args.setups.split(",")]
    return args


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(args, model: str, setup: Setup, factory: PromptFactory) -> TritonServer:
    """A tritonserver on free loopback ports for setup, warmed up with a few short requests."""
    folder, runner = MODELS[model]
    work_dir = BUILD_DIR / "triton" / f"{model}-{setup.instances}x{setup.num_threads}"
    work_dir.mkdir(parents=True, exist_ok=True)
    params = {"runner": runner, "num_threads": str(setup.num_threads), "max_num_seqs": str(args.max_num_seqs),
              "kv_cache_memory_bytes": args.kv_cache_memory_bytes}
    options = ServerOptions(model_dir=folder, http_port=_free_port(), grpc_port=_free_port(),
                            metrics_port=_free_port(), engine_parameters=params, work_dir=work_dir,
                            instances=setup.instances)
    server = TritonServer(options, log_file=work_dir / "tritonserver.log")
    server.start(timeout=300)
    warm = fixed_requests(factory, "warmup", 4 * setup.instances, 32, 8)
    records = asyncio.run(closed_loop(server.grpc_url, warm, 4 * setup.instances, InFlight()))
    if any(r.error for r in records):
        server.stop()
        raise RuntimeError(f"warm-up failed: {records[0].error}; see {server.log_file}")
    return server


def run_setup(args, model: str, setup: Setup, factory: PromptFactory, tag: str) -> dict:
    """Every concurrency level on a fresh server; per level the summary and each engine's token share."""
    server = start_server(args, model, setup, factory)
    results = {}
    try:
        for c in args.levels:
            specs = fixed_requests(factory, f"{tag}-c{c}", args.requests_factor * c, args.prompt_tokens,
                                   args.output_tokens)
            before = scrape_engines(server.metrics_url)
            summary = measure(server, lambda: closed_loop(server.grpc_url, specs, c, InFlight()))
            time.sleep(0.3)  # NOTE: the engines publish their idle snapshots right after their last step
            after = scrape_engines(server.metrics_url)
            summary["engine_output_tokens"] = {
                engine: after[engine]["lepton_generated_tokens_total"]
                - before.get(engine, {}).get("lepton_generated_tokens_total", 0.0) for engine in sorted(after)
            }
            results[str(c)] = summary
            log(f"[{model}] {setup.name}, c={c}: {report.one_line(summary)}, per engine {summary['engine_output_tokens']}")
    finally:
        server.stop()
    return results


def log(message: str) -> None:
    print(f"{datetime.datetime.now():%H:%M:%S} {message}", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.from_json:
        args.doc.write_text(markdown(json.loads(args.from_json.read_text())))
        return 0
    words = ["python", "-m", "benchmarks.instances", *(sys.argv[1:] if argv is None else argv)]
    result = {"command": " ".join(shlex.quote(w) for w in words),
              "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "machine": machine_info(), "parameters": {k: str(v) for k, v in vars(args).items()}, "runs": []}
    for model in args.models.split(","):
        folder = MODELS[model][0]
        factory = PromptFactory(tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json")), seed=0)
        for round_index in range(args.rounds):
            order = args.setups if round_index % 2 == 0 else args.setups[::-1]
            for setup in order:
                levels = run_setup(args, model, setup, factory, f"r{round_index}")
                result["runs"].append({"model": model, "round": round_index + 1, "setup": setup.name,
                                       "instances": setup.instances, "num_threads": setup.num_threads,
                                       "levels": levels, "loadavg_after": os.getloadavg()})
    result["finished"] = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))
    args.doc.parent.mkdir(parents=True, exist_ok=True)
    args.doc.write_text(markdown(result))
    log(f"wrote {args.json} and {args.doc}")
    return 0


def markdown(result: dict) -> str:
    """The results table (one row a model, setup, round and level) and the ratios of each round."""
    args = argparse.Namespace(**result["parameters"])
    first_setup = result["runs"][0]["setup"]
    lines = [
        "# Engine instances: N instances x 1 thread vs 1 instance x all threads", "",
        f"`{result['command']}`, {result['date']} to {result['finished']}; machine: {result['machine']}.", "",
        f"Closed loop, {args.requests_factor} x concurrency requests a level, {args.prompt_tokens}-token prompts, "
        f"{args.output_tokens} output tokens (greedy, ignore_eos), gRPC streaming; KV cache "
        f"{args.kv_cache_memory_bytes} a server (split between instances), max_num_seqs {args.max_num_seqs} an "
        "instance. A fresh server per setup and round; setups alternate, the order reversed every other round.", "",
        "| model | setup | round | conc. | out tok/s | TTFT ms p50 / p90 | ITL ms p50 / p90 | output tokens per engine "
        "| server cores used | out tokens per server CPU-s | loadavg after |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in result["runs"]:
        for c, s in run["levels"].items():
            if "ttft_ms" not in s:
                lines.append(f"| {run['model']} | {run['setup']} | {run['round']} | {c} | failed: {s.get('errors')} | | | | | | |")
                continue
            shares = " / ".join(f"{v:.0f}" for v in s["engine_output_tokens"].values())
            lines.append(
                f"| {run['model']} | {run['setup']} | {run['round']} | {c} | {s['output_tok_per_s']:.1f} | "
                f"{s['ttft_ms']['p50']:.0f} / {s['ttft_ms']['p90']:.0f} | {s['itl_ms']['p50']:.1f} / "
                f"{s['itl_ms']['p90']:.1f} | {shares} | {s['cpu']['server_cores']:.2f} | "
                f"{s['output_tokens'] / max(s['cpu']['server_s'], 1e-9):.0f} | {run['loadavg_after'][0]:.2f} |")
    lines += ["", "Ratios to the first setup, same model, round and level (throughput: > 1 = the other is "
              "faster; TTFT and ITL p50: < 1 = the other is faster):", "",
              "| model | round | conc. | setup | out tok/s ratio | TTFT p50 ratio | ITL p50 ratio |", "|---|---|---|---|---|---|---|"]
    for run in result["runs"]:
        base = next(r for r in result["runs"] if r["model"] == run["model"] and r["round"] == run["round"]
                    and r["setup"] == first_setup)
        if run is base:
            continue
        for c, s in run["levels"].items():
            b = base["levels"].get(c, {})
            if "ttft_ms" in s and "ttft_ms" in b:
                lines.append(f"| {run['model']} | {run['round']} | {c} | {run['setup']} | "
                             f"{s['output_tok_per_s'] / b['output_tok_per_s']:.2f} | "
                             f"{s['ttft_ms']['p50'] / b['ttft_ms']['p50']:.2f} | {s['itl_ms']['p50'] / b['itl_ms']['p50']:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())

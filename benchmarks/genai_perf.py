"""genai-perf against `lepton`: a short profile (TTFT, inter-token latency, output tokens/s) per backend style.

    .venv/bin/python -m benchmarks.genai_perf               # against `make serve` (gRPC 127.0.0.1:8001)
    .venv/bin/python -m benchmarks.genai_perf --start       # a server of its own on the demo model
    .venv/bin/python -m benchmarks.genai_perf --quick --url HOST:PORT
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path

from benchmarks.perf import MODEL_NAME, VENV_BIN, add_server_args, served_model_dir, target_server, tool_env
from lepton.server import PROJECT_ROOT

REPORT_DIR = PROJECT_ROOT / "build" / "reports" / "genai-perf"
BACKENDS = ("vllm", "tensorrtllm")
# NOTE: keys of genai-perf's profile_export_genai_perf.json (0.0.16 reports latencies in ms).
METRICS = (("time_to_first_token", "TTFT ms"), ("inter_token_latency", "ITL ms"),
           ("request_latency", "latency ms"), ("output_token_throughput", "output tok/s"),
           ("request_throughput", "requests/s"), ("output_sequence_length", "output tokens"),
           ("input_sequence_length", "input tokens"))


def genai_perf_command(args, grpc_url: str, tokenizer: Path, backend: str, artifact_dir: Path) -> list[str]:
    """`genai-perf profile` for one backend style, exactly as a user would type it."""
    # NOTE: no --warmup-request-count: perf_analyzer 2.51 then never stops sending.
    return [str(VENV_BIN / "genai-perf"), "profile", "-m", MODEL_NAME, "--backend", backend,
            "--endpoint-type", "kserve", "--streaming", "-u", grpc_url, "--tokenizer", str(tokenizer),
            "--num-prompts", str(args.num_prompts), "--synthetic-input-tokens-mean", str(args.input_tokens),
            "--synthetic-input-tokens-stddev", "0", "--output-tokens-mean", str(args.output_tokens),
            "--output-tokens-mean-deterministic", "--concurrency", str(args.concurrency),
            "--request-count", str(args.request_count), "--random-seed", "0", "--artifact-dir", str(artifact_dir)]


def profile(args, grpc_url: str, tokenizer: Path, backend: str) -> dict:
    """Run genai-perf for one backend; its stats (avg, p50, p99) as METRICS names them, or its error."""
    artifact_dir = args.out / f"{backend}-c{args.concurrency}"
    artifact_dir.mkdir(parents=True, exist_ok=True)
    command = genai_perf_command(args, grpc_url, tokenizer, backend, artifact_dir)
    result = subprocess.run(command, env=tool_env(), capture_output=True, text=True, timeout=args.timeout,
                            cwd=artifact_dir)
    (artifact_dir / "genai-perf.log").write_text(" ".join(command) + "\n\n" + result.stdout + result.stderr)
    row = {"backend": backend, "concurrency": args.concurrency, "artifact_dir": str(artifact_dir)}
    exports = sorted(artifact_dir.rglob("profile_export_genai_perf.json"), key=lambda p: p.stat().st_mtime)
    if result.returncode != 0 or not exports:
        return {**row, "error": (result.stdout + result.stderr).strip().splitlines()[-3:]}
    stats = json.loads(exports[-1].read_text())
    for key, _ in METRICS:
        for stat in ("avg", "p50", "p99"):
            row[f"{key}_{stat}"] = stats.get(key, {}).get(stat)
    row["request_count"] = stats.get("request_count", {}).get("avg")
    return row


def print_summary(rows: list[dict]) -> None:
    print(f"{'backend':<13}{'':>6}" + "".join(f"{label:>13}" for _, label in METRICS))
    for r in rows:
        if r.get("error"):
            print(f"{r['backend']:<13} failed: {r['error']}")
            continue
        for stat in ("avg", "p50", "p99"):
            cells = "".join("{:>13}".format("–" if r.get(f"{k}_{stat}") is None else f"{r[f'{k}_{stat}']:.2f}")
                            for k, _ in METRICS)
            print(f"{r['backend'] if stat == 'avg' else '':<13}{stat:>6}{cells}")


FULL = {"concurrency": 4, "request_count": 32, "num_prompts": 16, "input_tokens": 128, "output_tokens": 64}
QUICK = {"concurrency": 2, "request_count": 6, "num_prompts": 4, "input_tokens": 24, "output_tokens": 8}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.genai_perf", description=__doc__.split("\n")[0])
    add_server_args(p)
    g = p.add_argument_group("profile")
    g.add_argument("--quick", action="store_true", help="short smoke; its defaults: " + str(QUICK))
    g.add_argument("--backends", default=",".join(BACKENDS), help="genai-perf --backend styles (default: %(default)s)")
    g.add_argument("--tokenizer", type=Path, default=None,
                   help="local tokenizer folder (default: the model folder the server loads)")
    g.add_argument("--concurrency", type=int, help=f"(default {FULL['concurrency']})")
    g.add_argument("--request-count", type=int, help=f"(default {FULL['request_count']})")
    g.add_argument("--num-prompts", type=int, help=f"distinct synthetic prompts (default {FULL['num_prompts']})")
    g.add_argument("--input-tokens", type=int, help=f"synthetic prompt length (default {FULL['input_tokens']})")
    g.add_argument("--output-tokens", type=int,
                   help=f"output tokens per request, deterministic (default {FULL['output_tokens']})")
    g.add_argument("--timeout", type=float, default=600, help="seconds per genai-perf run (default: %(default)s)")
    p.add_argument("--out", type=Path, default=REPORT_DIR, help="report folder (default: build/reports/genai-perf)")
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():  # NOTE: an explicit flag wins over --quick
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    with target_server(args) as (grpc_url, _):
        tokenizer = args.tokenizer or served_model_dir(grpc_url) or args.model
        print(f"[genai-perf] {MODEL_NAME} at {grpc_url}, tokenizer {tokenizer}, concurrency {args.concurrency}, "
              f"{args.request_count} requests of {args.input_tokens} -> {args.output_tokens} tokens")
        rows = [profile(args, grpc_url, tokenizer, b) for b in args.backends.split(",") if b]
    (args.out / "summary.json").write_text(json.dumps(rows, indent=1) + "\n")
    with open(args.out / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        writer.writeheader()
        writer.writerows(rows)
    print_summary(rows)
    print(f"[genai-perf] {args.out / 'summary.csv'}; genai-perf's own artifacts under {args.out}/<backend>-c<N>/")
    return 0 if not any(r.get("error") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

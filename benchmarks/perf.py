"""perf_analyzer recipes for `lepton`: concurrency sweeps over gRPC streaming, server-side statistics, CSV and plots.

    .venv/bin/python -m benchmarks.perf                      # against `make serve` (gRPC 127.0.0.1:8001)
    .venv/bin/python -m benchmarks.perf --start              # a server of its own on the demo model
    .venv/bin/python -m benchmarks.perf --quick --url HOST:PORT --metrics-url http://HOST:PORT/metrics
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from client.metrics import scrape
from lepton.server import PROJECT_ROOT, ServerOptions, TritonServer

MODEL_NAME = "lepton"
DEMO_MODEL = PROJECT_ROOT / "build" / "models" / "demo"
REPORT_DIR = PROJECT_ROOT / "build" / "reports" / "perf"
VENV_BIN = Path(sys.executable).parent
PROMPTS = (
    "The quick brown fox jumps over the lazy dog while the farmer counts his sheep in the field.",
    "Explain in a few sentences how a paged key-value cache lets a server batch many requests.",
    "Write a short story about a lighthouse keeper who finds a message in a bottle one morning.",
    "List the steps to make a cup of tea, from boiling the water to adding milk and sugar.",
)
STYLES = ("vllm", "tensor", "chat")
COUNTERS = ("lepton_generated_tokens_total", "lepton_prompt_tokens_total", "lepton_num_preemptions_total",
            "lepton_prefix_cache_hits_total", "lepton_prefix_cache_queries_total")


def tool_env() -> dict[str, str]:
    """PATH and LD_LIBRARY_PATH for perf_analyzer / genai-perf (no hub, the wheel's libcudart)."""
    import nvidia.cuda_runtime

    # NOTE: perf_analyzer links libcudart even without a GPU; the wheel's copy is enough.
    cudart = Path(list(nvidia.cuda_runtime.__path__)[0]) / "lib"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(cudart), env.get("LD_LIBRARY_PATH", "")) if p)
    return env


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _is_live(grpc_url: str) -> bool:
    import tritonclient.grpc as grpcclient

    with contextlib.suppress(Exception):
        return grpcclient.InferenceServerClient(grpc_url).is_model_ready(MODEL_NAME)
    return False


@contextlib.contextmanager
def target_server(args: argparse.Namespace):
    """(grpc_url, metrics_url): the server at --url, or one started here (--start, or nothing answers there)."""
    if not args.start and _is_live(args.url):
        yield args.url, args.metrics_url or f"http://{args.url.rsplit(':', 1)[0]}:8002/metrics"
        return
    why = "--start" if args.start else f"no {MODEL_NAME} at {args.url}"
    print(f"[load] {why}: starting tritonserver on {args.model}")
    params = dict(p.split("=", 1) for p in args.param)
    with tempfile.TemporaryDirectory(prefix="lepton-load-") as work:
        options = ServerOptions(model_dir=args.model, http_port=_free_port(), grpc_port=_free_port(),
                                metrics_port=_free_port(), work_dir=Path(work), engine_parameters=params)
        triton = TritonServer(options, log_file=Path(work) / "tritonserver.log")
        try:
            triton.start()
        except Exception:
            print((Path(work) / "tritonserver.log").read_text()[-3000:])
            raise
        try:
            yield triton.grpc_url, triton.metrics_url
        finally:
            triton.stop()


def served_model_dir(grpc_url: str) -> Path | None:
    """The folder the server's `lepton` model loads (its tokenizer is the one to count with)."""
    import tritonclient.grpc as grpcclient

    config = grpcclient.InferenceServerClient(grpc_url).get_model_config(MODEL_NAME).config
    value = config.parameters["model_dir"].string_value if "model_dir" in config.parameters else ""
    return Path(value) if value and Path(value).is_absolute() else None


def add_server_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("server")
    g.add_argument("--url", default="127.0.0.1:8001", help="gRPC address of a running server (default: %(default)s)")
    g.add_argument("--metrics-url", help="its Prometheus endpoint (default: --url's host, port 8002)")
    g.add_argument("--start", action="store_true", help="start a tritonserver here even if one answers at --url")
    g.add_argument("--model", type=Path, default=DEMO_MODEL,
                   help="model folder of a server started here (default: build/models/demo)")
    g.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="engine parameter of a server started here (repeatable)")


def request_row(style: str, prompt: str, max_tokens: int) -> dict:
    """One perf_analyzer input-data entry in the given request style (ignore_eos: fixed output length)."""
    if style == "vllm":
        sampling = {"max_tokens": max_tokens, "ignore_eos": True, "temperature": 0}
        return {"text_input": [prompt], "stream": [True], "sampling_parameters": [json.dumps(sampling)]}
    common = {"stream": [True], "max_tokens": [max_tokens], "ignore_eos": [True], "temperature": [0.0]}
    if style == "tensor":
        return {"text_input": [prompt], **common}
    if style == "chat":
        return {"messages": [json.dumps([{"role": "user", "content": prompt}])], **common}
    raise ValueError(f"style must be one of {', '.join(STYLES)}, got {style!r}")


def write_input_data(style: str, max_tokens: int, path: Path) -> Path:
    """perf_analyzer --input-data JSON: one entry per prompt, sent round-robin."""
    path.write_text(json.dumps({"data": [request_row(style, p, max_tokens) for p in PROMPTS]}, indent=1) + "\n")
    return path


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def summarize_export(export_file: Path) -> dict:
    """TTFT, ITL, end-to-end latency (ms) and output tokens/s from perf_analyzer's per-request timestamps."""
    requests = json.loads(export_file.read_text())["experiments"][0]["requests"]
    ttft, itl, e2e, num_tokens = [], [], [], 0
    starts, ends = [], []
    for r in requests:
        times = r["response_timestamps"]
        if not times:
            continue
        starts.append(r["timestamp"])
        ends.append(times[-1])
        ttft.append((times[0] - r["timestamp"]) / 1e6)
        e2e.append((times[-1] - r["timestamp"]) / 1e6)
        outputs = [o for o in r.get("response_outputs", []) if "num_output_tokens" in o]
        tokens = int(outputs[-1]["num_output_tokens"]) if outputs else len(times)
        num_tokens += tokens
        if tokens > 1:
            itl.append((times[-1] - times[0]) / 1e6 / (tokens - 1))
    span_s = (max(ends) - min(starts)) / 1e9 if starts else 0.0
    row = {"num_requests": len(e2e), "output_tokens": num_tokens,
           "output_tok_per_s": num_tokens / span_s if span_s else 0.0,
           "requests_per_s": len(e2e) / span_s if span_s else 0.0}
    for name, values in (("ttft_ms", ttft), ("itl_ms", itl), ("latency_ms", e2e)):
        row[f"{name}_p50"], row[f"{name}_p99"] = _percentile(values, 50), _percentile(values, 99)
        row[f"{name}_avg"] = statistics.fmean(values) if values else None
    return row


def server_snapshot(grpc_url: str, metrics_url: str) -> dict[str, float]:
    """Triton's model statistics for `lepton` and Lepton's Prometheus counters, to difference around a run."""
    import tritonclient.grpc as grpcclient

    stats = grpcclient.InferenceServerClient(grpc_url).get_inference_statistics(MODEL_NAME, as_json=True)
    model = stats["model_stats"][0]["inference_stats"]
    snap = {f"triton_{k}_{f}": float(model.get(k, {}).get(f, 0))
            for k in ("success", "fail", "queue", "compute_infer") for f in ("count", "ns")}
    with contextlib.suppress(OSError):
        counters = scrape(metrics_url)
        snap.update({k: counters[k] for k in COUNTERS if k in counters})
    return snap


def server_delta(before: dict[str, float], after: dict[str, float]) -> dict:
    """What the server saw during one run: requests, failures, queue time, tokens, preemptions."""
    d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    ok = d.get("triton_success_count", 0.0)
    return {"server_requests": int(ok), "server_failures": int(d.get("triton_fail_count", 0.0)),
            "server_queue_us": d.get("triton_queue_ns", 0.0) / ok / 1e3 if ok else None,
            "server_generated_tokens": int(d.get("lepton_generated_tokens_total", 0.0)),
            "server_prompt_tokens": int(d.get("lepton_prompt_tokens_total", 0.0)),
            "server_preemptions": int(d.get("lepton_num_preemptions_total", 0.0))}


def run_perf_analyzer(args, grpc_url: str, metrics_url: str, input_file: Path, concurrency: int, stem: Path) -> dict:
    """One perf_analyzer run at one concurrency; its CSV row, its timestamps summarized, the server's delta."""
    num_requests = max(args.min_requests, args.requests_per_concurrency * concurrency)
    command = [str(VENV_BIN / "perf_analyzer"), "-m", MODEL_NAME, "-u", grpc_url, "-i", "grpc", "--streaming",
               "--input-data", str(input_file), "--concurrency-range", str(concurrency),
               "-f", f"{stem}.csv", "--verbose-csv", "--profile-export-file", f"{stem}.json"]
    if args.measurement_interval:  # NOTE: stabilized time windows; they can fail on a busy, shared machine
        command += ["--measurement-interval", str(args.measurement_interval), "-s", str(args.stability), "-r", "10"]
    else:
        command += ["--request-count", str(num_requests)]
    if args.collect_metrics:
        command += ["--collect-metrics", "--metrics-url", metrics_url.removeprefix("http://"),
                    "--metrics-interval", "200"]
    before = server_snapshot(grpc_url, metrics_url)
    result = subprocess.run(command, env=tool_env(), capture_output=True, text=True, timeout=args.timeout)
    Path(f"{stem}.log").write_text(" ".join(command) + "\n\n" + result.stdout + result.stderr)
    row = {"concurrency": concurrency, **server_delta(before, server_snapshot(grpc_url, metrics_url))}
    if result.returncode != 0 or not Path(f"{stem}.csv").exists():
        return {**row, "error": (result.stdout + result.stderr).strip().splitlines()[-1:]}
    with open(f"{stem}.csv") as f:
        pa = next(csv.DictReader(f))
    row.update({"pa_infer_per_s": float(pa["Inferences/Second"]),
                "pa_responses_per_s": float(pa.get("Response Throughput") or 0),
                "pa_p50_latency_us": float(pa["p50 latency"]), "pa_p99_latency_us": float(pa["p99 latency"]),
                "pa_server_queue_us": float(pa["Server Queue"]),
                "pa_server_compute_us": float(pa["Server Compute Infer"])})
    row.update(summarize_export(Path(f"{stem}.json")))
    return row


COLUMNS = ("style", "concurrency", "num_requests", "output_tokens", "requests_per_s", "output_tok_per_s",
           "ttft_ms_p50", "ttft_ms_p99", "itl_ms_p50", "itl_ms_p99", "latency_ms_p50", "latency_ms_p99",
           "pa_infer_per_s", "pa_responses_per_s", "pa_p50_latency_us", "pa_p99_latency_us", "pa_server_queue_us",
           "pa_server_compute_us", "server_requests", "server_failures", "server_queue_us",
           "server_generated_tokens", "server_prompt_tokens", "server_preemptions", "error")


def write_csv(rows: list[dict], path: Path) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def plot(rows: list[dict], out_dir: Path) -> list[Path]:
    """Throughput against latency (TTFT p50, end-to-end p50), one line per request style, points = concurrency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for key, label in (("ttft_ms_p50", "TTFT p50 (ms)"), ("latency_ms_p50", "request latency p50 (ms)")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for style in dict.fromkeys(r["style"] for r in rows):
            points = [r for r in rows if r["style"] == style and r.get(key) is not None]
            ax.plot([r[key] for r in points], [r["output_tok_per_s"] for r in points], "o-", label=style)
            for r in points:
                ax.annotate(str(r["concurrency"]), (r[key], r["output_tok_per_s"]), fontsize=7,
                            textcoords="offset points", xytext=(3, 3))
        ax.set(xlabel=label, ylabel="output tokens/s", title=f"{MODEL_NAME}: throughput vs {label.split(' (')[0]}")
        ax.grid(alpha=0.3)
        ax.legend(title="request style", fontsize=8)
        fig.tight_layout()
        paths.append(out_dir / f"throughput_vs_{key.removesuffix('_p50')}.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths


def print_table(rows: list[dict]) -> None:
    print(f"{'style':<7}{'conc':>5}{'req/s':>8}{'out tok/s':>11}{'TTFT p50':>10}{'ITL p50':>9}{'lat p50':>9}"
          f"{'srv queue':>11}{'fail':>6}   (ms unless noted; srv queue in us)")
    fmt = lambda v, d=1: "–" if v is None else f"{v:.{d}f}"  # noqa: E731
    for r in rows:
        if r.get("error"):
            print(f"{r['style']:<7}{r['concurrency']:>5}  failed: {r['error']}")
            continue
        print(f"{r['style']:<7}{r['concurrency']:>5}{fmt(r['requests_per_s']):>8}{fmt(r['output_tok_per_s']):>11}"
              f"{fmt(r['ttft_ms_p50']):>10}{fmt(r['itl_ms_p50'], 2):>9}{fmt(r['latency_ms_p50']):>9}"
              f"{fmt(r['server_queue_us'], 0):>11}{r['server_failures']:>6}")


FULL = {"concurrency": "1,2,4,8,16", "max_tokens": 32, "requests_per_concurrency": 4, "min_requests": 16}
QUICK = {"concurrency": "1,2", "max_tokens": 8, "requests_per_concurrency": 2, "min_requests": 4}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.perf", description=__doc__.split("\n")[0])
    add_server_args(p)
    g = p.add_argument_group("sweep")
    g.add_argument("--quick", action="store_true", help="seconds-long smoke; its defaults: " + str(QUICK))
    g.add_argument("--styles", default=",".join(STYLES), help="request styles (default: %(default)s)")
    g.add_argument("--concurrency", help=f"comma-separated levels (default: {FULL['concurrency']})")
    g.add_argument("--max-tokens", type=int, help=f"output tokens per request, ignore_eos ({FULL['max_tokens']})")
    g.add_argument("--requests-per-concurrency", type=int,
                   help=f"requests per level = max(this * c, --min-requests) ({FULL['requests_per_concurrency']})")
    g.add_argument("--min-requests", type=int, help=f"({FULL['min_requests']})")
    g.add_argument("--measurement-interval", type=int, default=0,
                   help="ms: perf_analyzer's stabilized time windows instead of a fixed request count")
    g.add_argument("--stability", type=int, default=50,
                   help="with --measurement-interval: perf_analyzer's -s, %% spread allowed (default: %(default)s)")
    g.add_argument("--no-collect-metrics", dest="collect_metrics", action="store_false",
                   help="skip perf_analyzer's --collect-metrics (Triton's Prometheus endpoint)")
    g.add_argument("--timeout", type=float, default=600, help="seconds per perf_analyzer run (default: %(default)s)")
    p.add_argument("--out", type=Path, default=REPORT_DIR, help="report folder (default: build/reports/perf)")
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():  # NOTE: an explicit flag wins over --quick
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    styles = [s for s in args.styles.split(",") if s]
    levels = [int(c) for c in args.concurrency.split(",") if c]
    raw = args.out / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    rows = []
    with target_server(args) as (grpc_url, metrics_url):
        print(f"[perf] {MODEL_NAME} at {grpc_url}; styles {styles}; concurrency {levels}; "
              f"{args.max_tokens} tokens each")
        for style in styles:
            input_file = write_input_data(style, args.max_tokens, args.out / f"input_{style}.json")
            for c in levels:
                rows.append({"style": style, **run_perf_analyzer(args, grpc_url, metrics_url, input_file, c,
                                                                 raw / f"{style}_c{c}")})
    csv_path = write_csv(rows, args.out / "perf.csv")
    (args.out / "perf.json").write_text(json.dumps(rows, indent=1) + "\n")
    print_table(rows)
    ok = [r for r in rows if not r.get("error")]
    images = plot(ok, args.out) if ok else []
    print(f"[perf] {', '.join(str(p) for p in (csv_path, *images))}; raw perf_analyzer output in {raw}")
    return 0 if len(ok) == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())

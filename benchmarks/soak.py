"""Soak: hold 32 concurrent streams for a long time; fail on any request error or RSS growth.

    make soak                                            # 30 minutes; make serve's server, else one of its own (demo model)
    make soak DURATION=10m
    .venv/bin/python -m benchmarks.soak --duration 60s --warmup 20s --start   # a short run on a server started here

Every --interval seconds it samples the server tree's RSS and threads (/proc, tritonserver and its
backend stubs), Lepton's KV and queue gauges (the metrics port), and TTFT / ITL percentiles of the
requests that ended in that window. The report (JSON, markdown, plots) goes to build/reports/soak/.
Exit status 1 when a request failed, when the engine was not idle at the end, or when RSS (or the
thread count) grew past its bound between the first and the last fifth of the run after warm-up.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import random
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import tokenizers
import tritonclient.grpc.aio as grpcaio

from benchmarks.loadgen import InFlight, RequestRecord, send_one
from benchmarks.machine import code_version, listening_pid, process_tree_usage
from benchmarks.perf import DEMO_MODEL, MODEL_NAME, _free_port, _is_live, served_model_dir
from benchmarks.stats import inter_token_gaps, percentiles
from benchmarks.workload import PromptFactory, RequestSpec
from client.metrics import scrape, wait_idle
from lepton.server import PROJECT_ROOT, ServerOptions, TritonServer

REPORT_DIR = PROJECT_ROOT / "build" / "reports" / "soak"
# NOTE: the KV pool is allocated when the model loads, so in steady state only per-request Python
# objects and allocator caches can move RSS. 64 MiB over a 30-minute run (tens of thousands of
# requests) catches a leak of a few KB per request; the 1,000-request storm test moved RSS ~4 MiB.
RSS_BOUND_MIB = 64
THREAD_BOUND = 8  # NOTE: Triton's front-end pools vary a little; a thread per request would not


@dataclass(frozen=True)
class SoakOptions:
    """What to run, for how long, and what counts as a failure."""

    duration_s: float = 1800.0
    warmup_s: float = 300.0  # growth is measured from the end of the warm-up
    interval_s: float = 5.0  # between samples
    concurrency: int = 32
    prompt_tokens: tuple[int, int] = (8, 512)  # log-uniform range of prompt lengths
    output_tokens: tuple[int, int] = (8, 256)  # uniform range of max_tokens (ignore_eos: exactly that many)
    rss_bound_mib: float = RSS_BOUND_MIB
    thread_bound: int = THREAD_BOUND
    seed: int = 0
    out_dir: Path = REPORT_DIR


@dataclass(frozen=True)
class Target:
    """The server under test: where to send, where its metrics are, and the root of its process tree."""

    grpc_url: str
    metrics_url: str
    pid: int | None  # None: RSS and threads are not sampled (a remote server)
    model_dir: Path  # whose tokenizer counts the prompt tokens


@dataclass(frozen=True)
class Sample:
    """The server and the client over one interval; latencies of the requests that ended in it."""

    t_s: float  # since the start
    rss_mib: float | None
    threads: int | None
    kv_blocks_used: int
    kv_cache_usage: float
    num_running: int
    num_waiting: int
    completed: int
    errors: int
    output_tok_per_s: float
    ttft_ms: dict = field(default_factory=dict)  # p50 / p90 / p99 / mean / n
    itl_ms: dict = field(default_factory=dict)


def request_pool(factory: PromptFactory, options: SoakOptions, size: int = 64) -> list[tuple[str, int]]:
    """(prompt, token count) of size prompts, lengths log-uniform in options.prompt_tokens."""
    rng = random.Random(options.seed)
    low, high = options.prompt_tokens
    lengths = [round(low * (high / low) ** rng.random()) for _ in range(size)]
    return [(p, factory.count(p)) for p in (factory.make(n) for n in lengths)]


async def hold_streams(target: Target, options: SoakOptions, pool, records: list[RequestRecord], deadline: float) -> None:
    """options.concurrency workers, each sending its next request as soon as one ends, until the deadline."""
    rng = random.Random(options.seed + 1)
    inflight, counter = InFlight(), iter(range(1 << 62))
    async with grpcaio.InferenceServerClient(target.grpc_url) as client:
        async def worker():
            while time.perf_counter() < deadline:
                prompt, num_tokens = rng.choice(pool)
                spec = RequestSpec(f"soak-{next(counter)}", prompt, num_tokens, rng.randint(*options.output_tokens))
                records.append(await send_one(client, spec, inflight))

        await asyncio.gather(*(worker() for _ in range(options.concurrency)))


def sample(target: Target, start: float, window: list[RequestRecord], window_s: float) -> Sample:
    """One sample: /proc of the server tree, the metrics port, and the window's finished requests."""
    usage = process_tree_usage(target.pid) if target.pid else None
    values = scrape(target.metrics_url)
    ok = [r for r in window if not r.error]
    ttft = [r.first_token_s - r.sent_s for r in ok if r.first_token_s is not None]
    return Sample(
        t_s=round(time.perf_counter() - start, 2),
        rss_mib=round(usage.rss_bytes / (1 << 20), 1) if usage else None,
        threads=usage.threads if usage else None,
        kv_blocks_used=int(values.get("lepton_kv_blocks_used", 0)),
        kv_cache_usage=round(values.get("lepton_kv_cache_usage", 0.0), 4),
        num_running=int(values.get("lepton_num_running", 0)),
        num_waiting=int(values.get("lepton_num_waiting", 0)),
        completed=len(ok), errors=len(window) - len(ok),
        output_tok_per_s=round(sum(r.num_output_tokens for r in ok) / max(window_s, 1e-9), 1),
        ttft_ms=percentiles(ttft, 1e3), itl_ms=percentiles([g for r in ok for g in inter_token_gaps(r)], 1e3),
    )


async def soak(target: Target, options: SoakOptions, log=print) -> tuple[list[Sample], list[RequestRecord]]:
    """Run the load and the sampler side by side; every record and every sample."""
    factory = PromptFactory(tokenizers.Tokenizer.from_file(str(target.model_dir / "tokenizer.json")), options.seed)
    pool = request_pool(factory, options)
    records: list[RequestRecord] = []
    start = time.perf_counter()
    load = asyncio.create_task(hold_streams(target, options, pool, records, start + options.duration_s))
    samples: list[Sample] = []
    seen, last = 0, start
    while True:
        await asyncio.wait([load], timeout=max(0.0, last + options.interval_s - time.perf_counter()))
        now = time.perf_counter()
        window, seen = records[seen:], len(records)
        samples.append(await asyncio.to_thread(sample, target, start, window, now - last))
        last = now
        s = samples[-1]
        log(f"[soak] {s.t_s:7.1f} s  RSS {s.rss_mib} MiB  threads {s.threads}  KV {s.kv_cache_usage:.0%}  "
            f"running {s.num_running} waiting {s.num_waiting}  done {s.completed} errors {s.errors}  "
            f"TTFT p50 {s.ttft_ms.get('p50')} ms  ITL p50 {s.itl_ms.get('p50')} ms")
        if load.done():
            await load  # NOTE: re-raises a failure of the load itself
            return samples, records


def verdict(samples: list[Sample], records: list[RequestRecord], idle: dict | None, options: SoakOptions) -> dict:
    """Growth of RSS and threads from the first to the last fifth after warm-up, errors, idleness at the end."""
    # NOTE: steady state only: from the end of the warm-up to the deadline, not the drain after it.
    after = [s for s in samples if options.warmup_s <= s.t_s <= options.duration_s and s.rss_mib is not None]
    fifth = max(1, len(after) // 5)
    growth = lambda key: (statistics.median(getattr(s, key) for s in after[-fifth:])  # noqa: E731
                          - statistics.median(getattr(s, key) for s in after[:fifth])) if len(after) >= 2 else None
    rss_growth, thread_growth = growth("rss_mib"), growth("threads")
    errors = [r.error for r in records if r.error]
    failures = []
    if errors:
        failures.append(f"{len(errors)} request(s) failed, e.g. {errors[0][:200]}")
    if idle is None:
        failures.append("the engine still held requests or KV blocks after the run")
    if samples and samples[0].rss_mib is not None and len(after) < 2:
        failures.append(f"fewer than 2 samples after the {options.warmup_s:.0f} s warm-up: RSS growth not measured")
    if rss_growth is not None and rss_growth > options.rss_bound_mib:
        failures.append(f"RSS grew {rss_growth:.1f} MiB after warm-up (bound {options.rss_bound_mib} MiB)")
    if thread_growth is not None and thread_growth > options.thread_bound:
        failures.append(f"threads grew by {thread_growth:.0f} after warm-up (bound {options.thread_bound})")
    return {"passed": not failures, "failures": failures, "num_errors": len(errors),
            "rss_growth_mib": None if rss_growth is None else round(rss_growth, 1), "thread_growth": thread_growth,
            "rss_slope_mib_per_hour": _slope(after), "num_samples_judged": len(after)}


def _slope(samples: list[Sample]) -> float | None:
    """Least-squares RSS slope over the samples, MiB per hour (reported, not judged)."""
    if len(samples) < 3:
        return None
    return round(statistics.linear_regression([s.t_s for s in samples], [s.rss_mib for s in samples]).slope * 3600, 2)


def summary(samples: list[Sample], records: list[RequestRecord], options: SoakOptions) -> dict:
    ok = [r for r in records if not r.error]
    ttft = [r.first_token_s - r.sent_s for r in ok if r.first_token_s is not None]
    wall = max((r.done_s for r in ok), default=0) - min((r.sent_s for r in ok), default=0)
    return {
        "requests": len(records), "completed": len(ok), "errors": len(records) - len(ok),
        "output_tokens": sum(r.num_output_tokens for r in ok), "prompt_tokens": sum(r.num_input_tokens for r in ok),
        "output_tok_per_s": round(sum(r.num_output_tokens for r in ok) / wall, 1) if wall else None,
        "ttft_ms": percentiles(ttft, 1e3), "itl_ms": percentiles([g for r in ok for g in inter_token_gaps(r)], 1e3),
        "kv_cache_usage_max": max((s.kv_cache_usage for s in samples), default=None),
        "num_waiting_max": max((s.num_waiting for s in samples), default=None),
    }


def run(target: Target, options: SoakOptions, command: str = "", log=print) -> dict:
    """Soak target, then write the report; the report's dict (see verdict()["passed"])."""
    started = datetime.datetime.now(datetime.timezone.utc)
    samples, records = asyncio.run(soak(target, options, log))
    try:
        idle = wait_idle(target.metrics_url, timeout=60)
    except AssertionError:
        idle = None
    usage = process_tree_usage(target.pid) if target.pid else None
    report = {
        "command": command, "date": started.isoformat(timespec="seconds"), "code": code_version(PROJECT_ROOT),
        "options": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(options).items()},
        "target": {"grpc_url": target.grpc_url, "metrics_url": target.metrics_url, "pid": target.pid,
                   "model_dir": str(target.model_dir)},
        "summary": summary(samples, records, options), "verdict": verdict(samples, records, idle, options),
        "idle_at_end": idle, "processes_at_end": usage.processes if usage else None,
        "samples": [asdict(s) for s in samples],
    }
    from benchmarks.soak_report import write_report

    for path in write_report(report, options.out_dir):
        log(f"[soak] wrote {path}")
    return report


@contextlib.contextmanager
def target_server(args: argparse.Namespace):
    """The server at --url (its pid from --server-pid or the process listening there), or one started here."""
    if not args.start and _is_live(args.url):
        pid = args.server_pid or listening_pid(int(args.url.rsplit(":", 1)[1]))
        metrics = args.metrics_url or f"http://{args.url.rsplit(':', 1)[0]}:8002/metrics"
        yield Target(args.url, metrics, pid, served_model_dir(args.url) or args.model)
        return
    print(f"[soak] {'--start' if args.start else f'no {MODEL_NAME} at {args.url}'}: starting tritonserver on {args.model}")
    params = dict(p.split("=", 1) for p in args.param)
    with tempfile.TemporaryDirectory(prefix="lepton-soak-") as work:
        options = ServerOptions(model_dir=args.model, http_port=_free_port(), grpc_port=_free_port(),
                                metrics_port=_free_port(), work_dir=Path(work), engine_parameters=params)
        with TritonServer(options, log_file=Path(work) / "tritonserver.log") as triton:
            yield Target(triton.grpc_url, triton.metrics_url, triton.process.pid, args.model)


def seconds(text: str) -> float:
    """'90', '90s', '15m' or '1h' as seconds."""
    units = {"s": 1, "m": 60, "h": 3600}
    return float(text[:-1]) * units[text[-1]] if text[-1:] in units else float(text)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--duration", type=seconds, default="30m", help="how long to hold the streams (90s, 15m, 1h)")
    p.add_argument("--warmup", type=seconds,
                   help="growth is measured after this (default: a sixth of the duration, at most 5m)")
    p.add_argument("--interval", type=seconds, default="5s", help="between samples")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--rss-bound-mib", type=float, default=RSS_BOUND_MIB, help="largest RSS growth after warm-up that passes")
    p.add_argument("--out", type=Path, default=REPORT_DIR, help="report folder")
    p.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("server")
    g.add_argument("--url", default="127.0.0.1:8001", help="gRPC address of a running server")
    g.add_argument("--metrics-url", help="its Prometheus endpoint (default: --url's host, port 8002)")
    g.add_argument("--server-pid", type=int, help="root of its process tree (default: the process listening at --url)")
    g.add_argument("--start", action="store_true", help="start a tritonserver here even if one answers at --url")
    g.add_argument("--model", type=Path, default=DEMO_MODEL, help="model folder of a server started here")
    g.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="engine parameter of a server started here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    words = sys.argv[1:] if argv is None else argv
    warmup_s = args.warmup if args.warmup is not None else min(300.0, args.duration / 6)
    options = SoakOptions(duration_s=args.duration, warmup_s=warmup_s,
                          interval_s=args.interval, concurrency=args.concurrency, rss_bound_mib=args.rss_bound_mib,
                          seed=args.seed, out_dir=args.out)
    with target_server(args) as target:
        if target.pid is None:
            print("[soak] no local process listens at --url: RSS and threads are not sampled (give --server-pid)")
        report = run(target, options, command=" ".join(["python -m benchmarks.soak", *map(shlex.quote, words)]))
    result = report["verdict"]
    print(f"[soak] {'PASSED' if result['passed'] else 'FAILED'}: " + ("; ".join(result["failures"]) or
          f"no errors, RSS growth {result['rss_growth_mib']} MiB after warm-up (bound {options.rss_bound_mib} MiB)"))
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())

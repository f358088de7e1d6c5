"""perf_analyzer sweeps of the stateless models (tokenizer, embeddings): dynamic batching off / on, 1..4 instances.

    .venv/bin/python -m benchmarks.stateless                # every setup, each on a fresh tritonserver
    .venv/bin/python -m benchmarks.stateless --quick        # seconds-long smoke
    .venv/bin/python -m benchmarks.stateless --served --url HOST:PORT   # as a running server has them (make perf)

A setup is a model's config.pbtxt with dynamic batching off or on (and a queue delay) and N instances;
each runs on a tritonserver of its own that serves that model alone, so nothing else takes the cores.
Setups of a model run back to back in one sitting; compare ratios within a sitting.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import text_format

from benchmarks.machine import machine_info
from benchmarks.perf import DEMO_MODEL, VENV_BIN, add_server_args, summarize_export, target_server, tool_env
from lepton.lifetime import kill_with_parent
from lepton.server import (PROJECT_ROOT, SOURCE_REPOSITORY, ServerOptions, TritonServer, server_command,
                           server_environment, set_model_parameters)

MODELS = ("tokenizer", "embeddings")
SMOLLM2 = PROJECT_ROOT / "build" / "models" / "smollm2-135m-instruct"
REPORT_DIR = PROJECT_ROOT / "build" / "reports" / "perf-stateless"
PARAGRAPH = ("A paged key-value cache stores the attention keys and values of every running sequence in fixed-size "
             "blocks, so that a server can admit many requests at once, share the blocks of a common prefix, and "
             "free a finished sequence's memory without moving anything else. ")
# NOTE: what a request carries: a prompt to count (about 130 tokens of SmolLM2), a passage to embed (about 45).
TEXTS = {"tokenizer": [PARAGRAPH * 3 + f"Question {i}: why?" for i in range(4)],
         "embeddings": [PARAGRAPH + f"Passage {i}." for i in range(4)]}


@dataclass(frozen=True)
class Setup:
    """One configuration of a model: dynamic batching (None: off; else its queue delay), instances."""

    batching_delay_us: int | None
    instances: int
    preferred_batch_sizes: tuple[int, ...] = ()
    num_threads: int = 0  # embeddings: torch threads of each instance; 0 = the model's default

    @classmethod
    def parse(cls, text: str) -> "Setup":
        """"off:2": batching off, 2 instances; "on:1": on, no queue delay; "on+2000/8-16:1": on, a
        2 ms queue delay, preferred batch sizes 8 and 16; "on:1x2": one instance of 2 threads."""
        mode, _, count = text.partition(":")
        batching, _, preferred = mode.partition("/")
        sizes = tuple(int(p) for p in preferred.split("-") if p)
        instances, _, threads = (count or "1").partition("x")
        if batching == "off" and not sizes:
            return cls(None, int(instances), num_threads=int(threads or 0))
        if batching == "on" or batching.startswith("on+"):
            return cls(int(batching[3:] or 0), int(instances), sizes, int(threads or 0))
        raise ValueError(f"setup {text!r}: expected off:N, on:N or on+DELAY_US[/SIZE-SIZE...]:N[xTHREADS]")

    @property
    def name(self) -> str:
        batching = "off" if self.batching_delay_us is None else f"on, delay {self.batching_delay_us} us"
        if self.preferred_batch_sizes:
            batching += f", preferred {'/'.join(map(str, self.preferred_batch_sizes))}"
        threads = f" x {self.num_threads} threads" if self.num_threads else ""
        return f"batching {batching}, {self.instances} instance{'s' if self.instances > 1 else ''}{threads}"


def write_repository(model: str, setup: Setup, model_dir: Path, repo: Path) -> Path:
    """A repository holding model alone, its config.pbtxt turned to setup."""
    from tritonclient.grpc import model_config_pb2

    shutil.rmtree(repo, ignore_errors=True)
    shutil.copytree(SOURCE_REPOSITORY / model, repo / model, ignore=shutil.ignore_patterns("__pycache__"))
    config_file = repo / model / "config.pbtxt"
    config = text_format.Parse(config_file.read_text(), model_config_pb2.ModelConfig())
    config.instance_group[0].count = setup.instances
    config.ClearField("dynamic_batching")
    if setup.batching_delay_us is not None:
        config.dynamic_batching.max_queue_delay_microseconds = setup.batching_delay_us
        config.dynamic_batching.preferred_batch_size.extend(setup.preferred_batch_sizes)
    config_file.write_text(text_format.MessageToString(config))
    threads = {"num_threads": str(setup.num_threads)} if setup.num_threads else {}
    set_model_parameters(repo / model, {"model_dir": str(model_dir.resolve()), **threads})
    return repo


class StageServer(TritonServer):
    """A tritonserver on one prepared repository (TritonServer would serve the whole model_repository/)."""

    def __init__(self, options: ServerOptions, repo: Path, log_file: Path) -> None:
        super().__init__(options, log_file)
        self.repo = repo

    def start(self, timeout: float = 300.0) -> "StageServer":
        with open(self.log_file, "w") as out:
            self.process = subprocess.Popen(server_command(self.options, self.repo), env=server_environment(),
                                            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                            preexec_fn=kill_with_parent)
        self.wait_ready(timeout)
        return self


def write_input_data(model: str, path: Path) -> Path:
    """perf_analyzer --input-data: one entry a text, sent round-robin, each a batch of one."""
    path.write_text(json.dumps({"data": [{"text_input": [t]} for t in TEXTS[model]]}, indent=1) + "\n")
    return path


def model_counts(grpc_url: str, model: str) -> tuple[int, int]:
    """Triton's (inferences, executions) of model so far: their ratio is the mean batch size."""
    import tritonclient.grpc as grpcclient

    stats = grpcclient.InferenceServerClient(grpc_url).get_inference_statistics(model, as_json=True)
    entry = stats["model_stats"][0]
    return int(entry.get("inference_count", 0)), int(entry.get("execution_count", 0))


def run_level(args, grpc_url: str, model: str, input_file: Path, concurrency: int, stem: Path) -> dict:
    """One perf_analyzer run (plain gRPC infer) at one concurrency: throughput, latency, mean batch size."""
    num_requests = max(args.min_requests, args.requests_per_concurrency * concurrency)
    command = [str(VENV_BIN / "perf_analyzer"), "-m", model, "-u", grpc_url, "-i", "grpc", "-b", "1",
               "--input-data", str(input_file), "--concurrency-range", str(concurrency),
               "--request-count", str(num_requests), "-f", f"{stem}.csv", "--profile-export-file", f"{stem}.json"]
    for attempt in range(2):
        before = model_counts(grpc_url, model)
        try:
            result = subprocess.run(command, env=tool_env(), capture_output=True, text=True, timeout=args.timeout)
            break
        except subprocess.TimeoutExpired as exc:
            # NOTE: seen once in a sweep: perf_analyzer 2.51 (sync, c=64) waiting on after every request
            # was answered (the server's counts complete). A rerun of the level went through.
            result = subprocess.CompletedProcess(command, 124, exc.stdout or "", f"timed out after {args.timeout} s")
            print(f"[stateless] {model} c={concurrency}: perf_analyzer timed out (attempt {attempt + 1})", flush=True)
    Path(f"{stem}.log").write_text(" ".join(command) + "\n\n" + _text(result.stdout) + _text(result.stderr))
    inferences, executions = (a - b for a, b in zip(model_counts(grpc_url, model), before))
    row = {"concurrency": concurrency, "num_requests": num_requests, "server_inferences": inferences,
           "mean_batch": inferences / executions if executions else None, "loadavg_1m": os.getloadavg()[0]}
    if result.returncode != 0 or not Path(f"{stem}.csv").exists():
        return {**row, "error": (_text(result.stdout) + _text(result.stderr)).strip().splitlines()[-1:]}
    with open(f"{stem}.csv") as f:
        pa = next(csv.DictReader(f))
    # NOTE: from the per-request timestamps: with --request-count, perf_analyzer 2.51's own
    # "Inferences/Second" divides by a window of at least a second, however fast the requests were.
    timed = summarize_export(Path(f"{stem}.json"))
    return {**row, "infer_per_s": timed["requests_per_s"], "p50_ms": timed["latency_ms_p50"],
            "p99_ms": timed["latency_ms_p99"], "queue_ms": float(pa["Server Queue"]) / 1e3,
            "compute_ms": float(pa["Server Compute Infer"]) / 1e3}


def sweep(args, grpc_url: str, model: str, label: str, raw: Path, round_index: int = 1) -> list[dict]:
    input_file = write_input_data(model, raw / f"input_{model}.json")
    rows = []
    for c in args.levels:
        stem = raw / f"{model}_{_slug(label)}_r{round_index}_c{c}"
        try:
            result = run_level(args, grpc_url, model, input_file, c, stem)
        except Exception as exc:  # NOTE: e.g. the server died: this level failed, the sweep goes on
            result = {"concurrency": c, "error": [repr(exc)[:200]]}
        row = {"model": model, "setup": label, "round": round_index, **result}
        print(one_line(row), flush=True)
        rows.append(row)
    return rows


def run_setups(args, raw: Path, on_setup) -> list[dict]:
    """Every model, round and setup on a fresh server; on_setup(rows so far) after each."""
    rows = []
    for model, round_index in ((m, r) for m in args.models for r in range(1, args.rounds + 1)):
        # NOTE: the order reversed every other round, so a neighbour's load hits the setups alike
        for setup in args.setups if round_index % 2 else args.setups[::-1]:
            work = args.out / "servers" / f"{model}_{_slug(setup.name)}_r{round_index}"  # NOTE: logs kept
            repo = write_repository(model, setup, args.model, work / "model_repository")
            options = ServerOptions(model_dir=args.model, http_port=_free_port(), grpc_port=_free_port(),
                                    metrics_port=_free_port())
            server = StageServer(options, repo, work / "tritonserver.log")
            try:
                server.start()
            except Exception:
                print(server.log_file.read_text()[-3000:])
                raise
            try:
                rows += sweep(args, server.grpc_url, model, setup.name, raw, round_index)
            finally:
                server.stop()
            on_setup(rows)
    return rows


def one_line(r: dict) -> str:
    head = f"{r['model']:<11}{r['setup']:<38}r{r['round']} c={r['concurrency']:<3}"
    if r.get("error"):
        return f"{head} failed: {r['error']}"
    batch = "–" if r["mean_batch"] is None else f"{r['mean_batch']:.1f}"
    return (f"{head}{r['infer_per_s']:>8.1f} infer/s  "
            f"p50 {r['p50_ms']:>7.1f} ms  p99 {r['p99_ms']:>7.1f} ms  queue {r['queue_ms']:>6.1f} ms  "
            f"compute {r['compute_ms']:>6.1f} ms  batch {batch}")


def markdown(rows: list[dict], meta: dict) -> str:
    """The sitting's table: one row a model, setup and concurrency; and each setup's throughput ratio."""
    m = meta["machine"]
    load = ", ".join(f"{v:.1f}" for v in m["loadavg_at_start"])
    lines = [f"`{meta['command']}`, {meta['date']} to {meta['finished']}; {m['nproc']} cores ({m['cpu_model']}), "
             f"load average at the start {load}.", "",
             "| model | setup | round | conc. | infer/s | p50 ms | p99 ms | queue ms | compute ms | mean batch "
             "| load 1m |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        head = f"| {r['model']} | {r['setup']} | {r['round']} | {r['concurrency']} |"
        if r.get("error"):
            lines.append(f"{head} failed | | | | | | |")
            continue
        batch = "–" if r["mean_batch"] is None else f"{r['mean_batch']:.1f}"
        lines.append(f"{head} {r['infer_per_s']:.1f} | "
                     f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['queue_ms']:.1f} | {r['compute_ms']:.1f} | {batch} | "
                     f"{'–' if r.get('loadavg_1m') is None else format(r['loadavg_1m'], '.1f')} |")
    setups = list(dict.fromkeys(r["setup"] for r in rows))
    levels = list(dict.fromkeys(r["concurrency"] for r in rows))
    if len(setups) < 2:
        return "\n".join(lines) + "\n"
    lines += ["", f"Throughput relative to \"{setups[0]}\", same round and concurrency (> 1: faster):", "",
              "| model | setup | round | " + " | ".join(f"c={c}" for c in levels) + " |",
              "|---|---|---|" + "---|" * len(levels)]
    ok = {(r["model"], r["setup"], r["round"], r["concurrency"]): r["infer_per_s"] for r in rows if not r.get("error")}
    for model, round_index in dict.fromkeys((r["model"], r["round"]) for r in rows):
        for setup in setups[1:]:
            base = [ok.get((model, setups[0], round_index, c)) for c in levels]
            cells = [f"{ok[model, setup, round_index, c] / b:.2f}" if b and (model, setup, round_index, c) in ok
                     else "–" for c, b in zip(levels, base)]
            lines.append(f"| {model} | {setup} | {round_index} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _text(output: str | bytes | None) -> str:
    return output.decode(errors="replace") if isinstance(output, bytes) else output or ""


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in text).strip("-")


FULL = {"concurrency": "1,4,16,64", "requests_per_concurrency": 8, "min_requests": 128, "rounds": 2,
        "setups": "off:1,on:1,off:2,on:2,off:4,on:4"}
QUICK = {"concurrency": "1,4", "requests_per_concurrency": 2, "min_requests": 8, "rounds": 1, "setups": "off:1,on:1"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.stateless", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="seconds-long smoke; its defaults: " + str(QUICK))
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated (default: %(default)s)")
    p.add_argument("--setups", help=f"comma-separated off:N / on:N / on+DELAY_US[/SIZE-SIZE...]:N[xTHREADS] (default: "
                                    f"{FULL['setups']}),"
                                    " each on a server of --model (default here: SmolLM2-135M-Instruct when built)")
    p.add_argument("--served", action="store_true",
                   help="no setups: sweep the models as the server at --url serves them (make perf; one is started "
                        "on --model when nothing answers there)")
    add_server_args(p)
    p.set_defaults(model=None)  # NOTE: told apart from an explicit --model below
    p.add_argument("--concurrency", help=f"comma-separated levels (default: {FULL['concurrency']})")
    p.add_argument("--requests-per-concurrency", type=int, help="requests per level = max(this * c, --min-requests)")
    p.add_argument("--min-requests", type=int)
    p.add_argument("--rounds", type=int, help="each setup this many times, the order reversed every other round")
    p.add_argument("--timeout", type=float, default=300,
                   help="seconds per perf_analyzer run, retried once (default: %(default)s)")
    p.add_argument("--out", type=Path, default=REPORT_DIR, help="report folder (default: build/reports/perf-stateless)")
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():  # NOTE: an explicit flag wins over --quick
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.models = [m for m in args.models.split(",") if m]
    args.levels = [int(c) for c in args.concurrency.split(",") if c]
    args.setups = [Setup.parse(s) for s in args.setups.split(",") if s]
    if args.model is None:  # NOTE: setups measure the model make serve serves, when it is built
        args.model = DEMO_MODEL if args.served or not (SMOLLM2 / "config.json").is_file() else SMOLLM2
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    words = ["python", "-m", "benchmarks.stateless", *(sys.argv[1:] if argv is None else argv)]
    meta = {"command": " ".join(shlex.quote(w) for w in words), "machine": machine_info(),
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
    raw = args.out / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    if args.served:
        with target_server(args) as (grpc_url, _):
            rows = [r for model in args.models for r in sweep(args, grpc_url, model, "as served", raw)]
    else:
        print(f"[stateless] {', '.join(args.models)} on {args.model}; setups "
              f"{', '.join(s.name for s in args.setups)}; concurrency {args.levels}", flush=True)
        # NOTE: the reports are rewritten after each setup, so a sweep stopped halfway leaves its rows
        rows = run_setups(args, raw, lambda so_far: write_reports(so_far, meta, args.out))
    write_reports(rows, meta, args.out)
    print(f"[stateless] {args.out / 'stateless.md'}, stateless.csv, stateless.json; raw perf_analyzer output in {raw}")
    return 0 if not any(r.get("error") for r in rows) else 1


def write_reports(rows: list[dict], meta: dict, out: Path) -> None:
    """stateless.csv, .json and .md of rows (the markdown table and throughput ratios)."""
    meta = {**meta, "finished": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
    with open(out / "stateless.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        writer.writeheader()
        writer.writerows(rows)
    (out / "stateless.json").write_text(json.dumps({**meta, "rows": rows}, indent=1) + "\n")
    (out / "stateless.md").write_text(markdown(rows, meta))


if __name__ == "__main__":
    sys.exit(main())

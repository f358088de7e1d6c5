"""Lepton behind a real tritonserver (gRPC streaming, benchmarks.loadgen; W2 also with perf_analyzer) and its
engine in process."""

from __future__ import annotations

import asyncio
import json
import resource
import socket
import subprocess
import time
from pathlib import Path

from benchmarks.loadgen import InFlight, RequestRecord, closed_loop, open_loop
from benchmarks.machine import process_tree_cpu_s
from benchmarks.peers.workloads import Workload
from benchmarks.serving import measure
from benchmarks.stats import summarize
from benchmarks.workload import fixed_requests
from client.metrics import scrape
from lepton.server import ServerOptions, TritonServer

PREFIX_COUNTERS = ("lepton_prefix_cache_hits_total", "lepton_prefix_cache_queries_total")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(model_dir: Path, params: dict[str, str], work_dir: Path, factory, log) -> TritonServer:
    """tritonserver on free loopback ports serving model_dir with params, warmed up with 4 requests."""
    work_dir.mkdir(parents=True, exist_ok=True)
    options = ServerOptions(model_dir=model_dir, http_port=_free_port(), grpc_port=_free_port(),
                            metrics_port=_free_port(), engine_parameters=params, work_dir=work_dir)
    server = TritonServer(options, log_file=work_dir / "tritonserver.log")
    started = time.monotonic()
    server.start(timeout=300)
    log(f"tritonserver ready in {time.monotonic() - started:.1f} s ({server.grpc_url}), log {server.log_file}")
    records = asyncio.run(closed_loop(server.grpc_url, fixed_requests(factory, "warmup", 4, 32, 8), 4, InFlight()))
    if any(r.error for r in records):
        server.stop()
        raise RuntimeError(f"warm-up failed: {records[0].error}; see {server.log_file}")
    return server


def run_served(server: TritonServer, workload: Workload) -> dict:
    """One workload through the server; the summary adds prefix-cache counter deltas."""
    specs = list(workload.specs)
    if workload.warmup:
        asyncio.run(closed_loop(server.grpc_url, list(workload.warmup), 1, InFlight()))
    before = scrape(server.metrics_url)
    if workload.concurrency is None:
        summary = measure(server, lambda: open_loop(server.grpc_url, specs, InFlight()))
    else:
        summary = measure(server, lambda: closed_loop(server.grpc_url, specs, workload.concurrency, InFlight()))
    time.sleep(0.3)  # NOTE: the engine publishes its idle snapshot right after the last step
    after = scrape(server.metrics_url)
    summary["metrics_delta"] = {k: after.get(k, 0) - before.get(k, 0) for k in PREFIX_COUNTERS}
    return summary


def run_served_perf_analyzer(server: TritonServer, workload: Workload, work_dir: Path) -> dict:
    """A closed-loop workload (W2) through the server driven by perf_analyzer, Triton's C++ load generator,
    instead of benchmarks.loadgen's Python client: the same requests (tensor style: greedy, ignore_eos, exactly
    max_tokens, streamed), workload.concurrency in flight, each sent once; the times are perf_analyzer's own
    (its profile export: when each request went out and each response came back). On a machine whose cores
    also compute, the client's CPU is taken from the server: perf_analyzer spends about half of loadgen's a
    token (docs/performance.md)."""
    from benchmarks.perf import VENV_BIN, request_row, tool_env

    specs = list(workload.specs)
    work_dir.mkdir(parents=True, exist_ok=True)
    data, export = work_dir / f"{workload.name}-input.json", work_dir / f"{workload.name}-export.json"
    data.write_text(json.dumps({"data": [request_row("tensor", s.prompt, s.max_tokens) for s in specs]}))
    export.unlink(missing_ok=True)
    command = [str(VENV_BIN / "perf_analyzer"), "-m", "lepton", "-u", server.grpc_url, "-i", "grpc", "--streaming",
               "--input-data", str(data), "--concurrency-range", str(workload.concurrency),
               "--request-count", str(len(specs)), "--profile-export-file", str(export)]
    children0, server0 = resource.getrusage(resource.RUSAGE_CHILDREN), process_tree_cpu_s(server.process.pid)
    result = subprocess.run(command, env=tool_env(), capture_output=True, text=True, timeout=1800)
    children1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0 or not export.is_file():
        raise RuntimeError(f"perf_analyzer failed ({result.returncode}): {(result.stdout + result.stderr)[-1500:]}")
    cpu = {"client_s": children1.ru_utime + children1.ru_stime - children0.ru_utime - children0.ru_stime,
           "server_s": process_tree_cpu_s(server.process.pid) - server0}
    return summarize(perf_analyzer_records(export, specs), cpu) | {"client": "perf_analyzer"}


def perf_analyzer_records(export: Path, specs) -> list[RequestRecord]:
    """perf_analyzer's profile export as the load generator's records, matched to specs by prompt; a spec it did
    not send is recorded as an error."""
    by_prompt = {s.prompt: RequestRecord(s) for s in specs}
    for request in json.loads(export.read_text())["experiments"][0]["requests"]:
        record = by_prompt[request["request_inputs"]["text_input"]]
        record.sent_s = request["timestamp"] / 1e9
        outputs = request.get("response_outputs") or [{}] * len(request["response_timestamps"])
        for at, output in zip(request["response_timestamps"], outputs):
            record.responses.append((at / 1e9, int(output.get("num_output_tokens", 0)),
                                     len(output.get("text_output", ""))))
            record.num_input_tokens = int(output.get("num_input_tokens", record.num_input_tokens))
            record.finish_reason = output.get("finish_reason") or record.finish_reason
        record.done_s = record.responses[-1][0] if record.responses else 0.0
    for record in by_prompt.values():
        if not record.responses:
            record.error = "perf_analyzer did not send it"
    return list(by_prompt.values())


def in_process_engine(model_dir: Path, params: dict[str, str]):
    """The engine the server runs, built in this process (lepton.engine.LLMEngine)."""
    from lepton.config import EngineConfig
    from lepton.engine import LLMEngine

    return LLMEngine(EngineConfig.from_parameters({"model_dir": str(model_dir), **params}))


def run_in_process(engine, workload: Workload) -> list[RequestRecord]:
    """The same engine without Triton: every request added at once, then step() until done.

    A token's time is when step() returned it with text (as the server would send it then).
    """
    from lepton.sampling_params import SamplingParams

    greedy = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    for i, spec in enumerate(workload.specs[:2]):
        engine.add_request(f"warmup-{i}", spec.prompt, greedy)
    while engine.has_unfinished():
        engine.step()
    records = {s.request_id: RequestRecord(s) for s in workload.specs}
    sent = time.perf_counter()
    for spec in workload.specs:
        records[spec.request_id].sent_s = sent
        records[spec.request_id].num_input_tokens = engine.add_request(
            spec.request_id, spec.prompt, greedy.replace(max_tokens=spec.max_tokens))
    while engine.has_unfinished():
        outputs = engine.step()
        now = time.perf_counter()
        for out in outputs:
            record = records[out.request_id]
            if out.text:
                record.responses.append((now, out.num_output_tokens, len(out.text)))
            if out.finished:
                record.done_s = now
                record.finish_reason = out.finish_reason.value if out.finish_reason else ""
                if not out.text:
                    record.responses.append((now, out.num_output_tokens, 0))
    return list(records.values())

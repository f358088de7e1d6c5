"""Lepton behind a real tritonserver (gRPC streaming, benchmarks.loadgen) and its engine in process."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

from benchmarks.loadgen import InFlight, RequestRecord, closed_loop, open_loop
from benchmarks.peers.workloads import Workload
from benchmarks.serving import measure
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

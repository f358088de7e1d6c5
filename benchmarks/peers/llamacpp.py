"""llama.cpp's llama-server (built by scripts/build_peers.sh) over HTTP streaming, /completion."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import aiohttp

from benchmarks.loadgen import RequestRecord, closed_loop_with, open_loop_with
from benchmarks.peers.workloads import Workload
from benchmarks.workload import RequestSpec
from lepton.server import PROJECT_ROOT

LLAMA_DIR = PROJECT_ROOT / "build" / "peers" / "llama.cpp"
SERVER_BIN = LLAMA_DIR / "bin" / "llama-server"


class LlamaServer:
    """A llama-server child process with `parallel` slots of `slot_context` tokens each."""

    def __init__(self, gguf: Path, port: int, parallel: int, slot_context: int, threads: int, log_file: Path):
        self.url = f"http://127.0.0.1:{port}"
        self.command = [
            str(SERVER_BIN), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
            "--parallel", str(parallel), "--cont-batching", "-t", str(threads), "-tb", str(threads),
            # NOTE: the context is split between the slots; each holds the longest request.
            "-c", str(parallel * slot_context), "--batch-size", "512", "--no-webui",
        ]
        self.log_file = log_file
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> "LlamaServer":
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        out = open(self.log_file, "w")
        self.process = subprocess.Popen(self.command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"llama-server exited with {self.process.returncode}; see {self.log_file}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as response:
                    if response.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.25)
        self.__exit__()
        raise TimeoutError(f"llama-server not ready after 120 s; see {self.log_file}")

    def __exit__(self, *exc) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def completion_body(token_ids: list[int], max_tokens: int) -> dict:
    """Greedy, ignore_eos, exactly max_tokens tokens, streamed; the prompt as token ids."""
    return {"prompt": token_ids, "n_predict": max_tokens, "stream": True, "ignore_eos": True,
            "temperature": 0.0, "top_k": 1, "cache_prompt": True, "return_tokens": True}


async def send_one(session: aiohttp.ClientSession, url: str, spec: RequestSpec, ids: list[int]) -> RequestRecord:
    """POST /completion with stream=true; one response record per server-sent event with tokens."""
    record = RequestRecord(spec, num_input_tokens=len(ids))
    record.sent_s = time.perf_counter()
    count = 0
    try:
        async with session.post(url + "/completion", json=completion_body(ids, spec.max_tokens)) as response:
            if response.status != 200:
                raise RuntimeError(f"HTTP {response.status}: {(await response.text())[:200]}")
            async for line in response.content:
                if not line.startswith(b"data: "):
                    continue
                now = time.perf_counter()
                event = json.loads(line[6:])
                new = len(event.get("tokens") or ()) or (1 if event.get("content") else 0)
                if new:
                    count += new
                    record.responses.append((now, count, len(event.get("content", "")) or new))
                if event.get("stop"):
                    record.num_input_tokens = event.get("tokens_evaluated", record.num_input_tokens)
                    stop_type = event.get("stop_type")
                    record.finish_reason = "length" if stop_type == "limit" else str(stop_type)
                    break
    except Exception as exc:  # NOTE: a failed request is reported, not fatal to the run
        record.error = f"{type(exc).__name__}: {exc}"
    record.done_s = time.perf_counter()
    return record


async def run_workload(url: str, workload: Workload, ids: dict[str, list[int]]) -> list[RequestRecord]:
    """The workload's requests, closed or open loop, over one HTTP session with enough connections."""
    # NOTE: one connection per request: reusing a kept-alive one after a finished stream failed now and
    # then ("Can not write request body"), as llama-server may close it.
    connector = aiohttp.TCPConnector(limit=len(workload.specs) + 4, force_close=True)
    timeout = aiohttp.ClientTimeout(total=3600)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        send = lambda spec: send_one(session, url, spec, ids[spec.request_id])  # noqa: E731
        if workload.warmup:
            await closed_loop_with(send, list(workload.warmup), 1)
        if workload.concurrency is None:
            return await open_loop_with(send, list(workload.specs))
        return await closed_loop_with(send, list(workload.specs), workload.concurrency)


def warm_up(url: str, ids: list[int]) -> None:
    """One short request, not measured (page-faults the weights in)."""
    spec = RequestSpec("warmup", "", len(ids), 4)

    async def once():
        async with aiohttp.ClientSession() as session:
            return await send_one(session, url, spec, ids)

    record = asyncio.run(once())
    if record.error:
        raise RuntimeError(f"llama-server warm-up failed: {record.error}")

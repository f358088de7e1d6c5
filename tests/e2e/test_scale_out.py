"""Two tritonserver replicas behind nginx, rendered from the compose `scale` profile's template.

A replica SIGKILLed under streamed load (HTTP generate_stream and gRPC streams through nginx) fails
its own requests quickly and clearly, never hangs them; the survivor serves everything after that
and is left idle, with no KV block held.
"""

from __future__ import annotations

import http.client
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient

from client.metrics import scrape as metrics
from client.metrics import wait_idle as wait_idle_at
from lepton.lifetime import descendants, kill_with_parent
from lepton.server import PROJECT_ROOT
from tritonio import MODEL, grpc_generate, http_generate, make_inputs

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

RENDER = PROJECT_ROOT / "deploy" / "nginx" / "render.sh"
PARAMS = {"max_num_seqs": "16", "kv_cache_memory_bytes": "64M"}
# NOTE: the same upstream flags as the compose `scale` profile (docker-compose.yml, x-lb-servers).
SERVER_FLAGS = "max_fails=1 fail_timeout=10s"
STREAM = {"text_input": "Once upon a time", "max_tokens": 600, "ignore_eos": True, "stream": True}
NUM_STREAMS = 6  # per protocol; nginx's round robin puts half of them on each replica
READ_TIMEOUT_S = 30.0  # a client waiting this long for the next piece of a stream calls it a hang
SETTLE_S = 20.0  # every request of the killed replica ends (with an error) this soon after the kill


@dataclass
class Outcome:
    """How one streamed request ended: completed, error (with the message) or hang."""

    protocol: str
    started: threading.Event = field(default_factory=threading.Event)
    result: str = "pending"
    detail: str = ""
    ended_at: float = 0.0

    def end(self, result: str, detail: str = "") -> None:
        self.result, self.detail, self.ended_at = result, detail, time.monotonic()


def http_stream(url: str, fields: dict, outcome: Outcome) -> None:
    """generate_stream through nginx, reading server-sent events as they arrive."""
    host, port = url.rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=READ_TIMEOUT_S)
    try:
        connection.request("POST", f"/v2/models/{MODEL}/generate_stream", json.dumps(fields),
                           {"Content-Type": "application/json"})
        response = connection.getresponse()
        if response.status != 200:
            return outcome.end("error", f"HTTP {response.status}: {response.read()[:200]!r}")
        last = None
        for line in response:
            if line.startswith(b"data: "):
                event = json.loads(line[len(b"data: "):])
                if "error" in event:
                    return outcome.end("error", event["error"])
                last = event
                outcome.started.set()
        if last is not None and last["finish_reason"] == "length" \
                and last["num_output_tokens"] == fields["max_tokens"]:
            return outcome.end("completed")
        outcome.end("error", f"stream ended early after {last}")
    except TimeoutError as exc:
        outcome.end("hang", repr(exc))
    except (http.client.HTTPException, OSError, ValueError) as exc:
        outcome.end("error", repr(exc))
    finally:
        connection.close()


def grpc_stream(url: str, fields: dict, outcome: Outcome) -> None:
    """One request on a gRPC bidirectional stream through nginx."""
    responses: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    try:
        client.async_stream_infer(MODEL, make_inputs(fields), enable_empty_final_response=True)
        num_tokens, finish_reason = 0, ""
        while True:
            try:
                result, error = responses.get(timeout=READ_TIMEOUT_S)
            except queue.Empty:
                return outcome.end("hang", f"no response for {READ_TIMEOUT_S} s")
            if error is not None:
                return outcome.end("error", str(error))
            outcome.started.set()
            if result.as_numpy("num_output_tokens") is not None:
                num_tokens = int(result.as_numpy("num_output_tokens")[0])
                finish_reason = result.as_numpy("finish_reason")[0].decode()
            if result.get_response().parameters["triton_final_response"].bool_param:
                break
        ok = finish_reason == "length" and num_tokens == fields["max_tokens"]
        outcome.end("completed" if ok else "error", f"{finish_reason} after {num_tokens} tokens")
    finally:
        client.stop_stream(cancel_requests=True)
        client.close()


def start_nginx(work_dir: Path, replicas, http_port: int, grpc_port: int) -> subprocess.Popen:
    """Debian's nginx in the foreground on loopback, with the config render.sh makes from the template."""
    nginx = shutil.which("nginx") or shutil.which("/usr/sbin/nginx")
    assert nginx, "nginx is missing: `make setup` installs Debian's nginx-light"
    conf = work_dir / "nginx.conf"
    env = {
        **os.environ,
        "LB_HTTP_SERVERS": " ".join(f"server {r.http_url} {SERVER_FLAGS};" for r in replicas),
        "LB_GRPC_SERVERS": " ".join(f"server {r.grpc_url} {SERVER_FLAGS};" for r in replicas),
        "LB_HTTP_LISTEN": f"127.0.0.1:{http_port}", "LB_GRPC_LISTEN": f"127.0.0.1:{grpc_port}",
        "LB_RUNTIME_DIR": str(work_dir / "run"), "LB_OUTPUT": str(conf),
    }
    subprocess.run(["sh", str(RENDER)], env=env, check=True, capture_output=True)
    command = [nginx, "-e", "stderr", "-c", str(conf), "-g", "daemon off;"]
    checked = subprocess.run(command + ["-t"], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr
    log = open(work_dir / "nginx.log", "w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, preexec_fn=kill_with_parent)
    deadline = time.monotonic() + 10
    for port in (http_port, grpc_port):
        while True:
            assert process.poll() is None, (work_dir / "nginx.log").read_text()
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "nginx did not listen within 10 s"
                time.sleep(0.1)
    return process


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_idle(server, timeout: float = 30.0) -> dict[str, float]:
    """Poll the server's metrics until no request runs or waits and no KV block is held."""
    return wait_idle_at(server.metrics_url, timeout, poll_s=0.2)


def end_orphans(pids: list[int], work_dir: Path, grace_s: float = 5.0) -> None:
    """SIGKILL the killed replica's backend stubs that have not exited by themselves after grace_s."""
    deadline, killed = time.monotonic() + grace_s, []
    for pid in pids:
        while True:
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                break  # gone
            if str(work_dir).encode() not in cmdline:
                break  # NOTE: the pid was reused by another process: not ours
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                break
            time.sleep(0.2)
    if killed:
        warnings.warn(f"backend processes {killed} outlived their SIGKILLed tritonserver by {grace_s} s")


@pytest.fixture
def replicas(demo_model_dir, start_triton, tmp_path):
    """Two real tritonservers on loopback."""
    # NOTE: started from this thread: a server dies with the thread that started it (kill_with_parent).
    started = []
    try:
        for name in ("a", "b"):
            started.append(start_triton(demo_model_dir, tmp_path / name, PARAMS))
        yield started
    finally:
        for server in started:
            server.stop()


@pytest.fixture
def balancer(replicas, tmp_path):
    """nginx in front of the replicas; (http url, grpc url)."""
    http_port, grpc_port = free_port(), free_port()
    process = start_nginx(tmp_path, replicas, http_port, grpc_port)
    yield f"127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}"
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def start_streams(num_streams: int, fields: dict, http_url: str, grpc_url: str):
    """num_streams HTTP and num_streams gRPC streams through nginx, each in a thread; (outcomes, threads)."""
    outcomes = [Outcome("http") for _ in range(num_streams)] + [Outcome("grpc") for _ in range(num_streams)]
    threads = [threading.Thread(target=http_stream if o.protocol == "http" else grpc_stream,
                                args=(http_url if o.protocol == "http" else grpc_url, fields, o), daemon=True)
               for o in outcomes]
    for thread in threads:
        thread.start()
    return outcomes, threads


def test_killed_replica_fails_fast_and_the_survivor_serves_the_rest(replicas, balancer):
    victim, survivor = replicas
    http_url, grpc_url = balancer
    outcomes, threads = start_streams(NUM_STREAMS, STREAM, http_url, grpc_url)
    for outcome in outcomes:
        assert outcome.started.wait(60), f"a {outcome.protocol} stream never started: {outcome}"
    assert metrics(victim.metrics_url)["lepton_num_running"] > 0, "nothing runs on the replica to kill"

    # NOTE: its backend stubs should exit once tritonserver is gone; any that do not are ended at
    # the end, so that no run leaves processes behind.
    victim_tree = descendants(victim.process.pid)
    os.kill(victim.process.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    try:
        check_outcomes_and_survivor(outcomes, threads, killed_at, http_url, grpc_url, survivor)
    finally:
        end_orphans(victim_tree, victim.options.work_dir)


def check_outcomes_and_survivor(outcomes, threads, killed_at, http_url, grpc_url, survivor) -> None:
    """No request hangs, the killed replica's fail fast, and the survivor serves the rest and ends idle."""
    for thread in threads:
        thread.join(max(0.0, killed_at + 2 * READ_TIMEOUT_S - time.monotonic()))
    assert not any(thread.is_alive() for thread in threads), f"requests still open: {outcomes}"
    assert not [o for o in outcomes if o.result == "hang"], outcomes
    errors = [o for o in outcomes if o.result == "error"]
    assert errors and len(errors) < len(outcomes), outcomes
    for outcome in errors:
        assert outcome.detail and outcome.ended_at - killed_at < SETTLE_S, outcome
    assert [o.result for o in outcomes].count("completed") + len(errors) == len(outcomes), outcomes

    # NOTE: later requests meet the dead replica first in the round robin; nginx retries them on
    # the survivor (a refused connection) and then leaves the dead one out for fail_timeout.
    short = {"text_input": "Hello", "max_tokens": 8, "ignore_eos": True}
    for _ in range(4):
        assert http_generate(http_url, short).num_output_tokens == 8
        assert grpc_generate(grpc_url, {**short, "stream": True}, timeout=READ_TIMEOUT_S).num_output_tokens == 8
    later, threads = start_streams(3, {**STREAM, "max_tokens": 32}, http_url, grpc_url)
    for thread in threads:
        thread.join(2 * READ_TIMEOUT_S)
    assert [o.result for o in later] == ["completed"] * len(later), later

    values = wait_idle(survivor)
    assert values["lepton_kv_blocks_used"] == 0 and values["lepton_num_running"] == 0

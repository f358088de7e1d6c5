"""The launcher, tritonserver and the backend stubs live and die together (issue 12, defects 9 and 10).

Each test starts `python -m lepton.server` as `make serve` does and checks what is left after a
hard kill or a stop with a stuck model: no process, no port.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from tests.conftest import free_port
from lepton.lifetime import descendants, port_in_use
from lepton.server import PROJECT_ROOT

pytestmark = pytest.mark.e2e


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = [pid for pid in pids if alive(pid)]
        if not left:
            return []
        time.sleep(0.2)
    return [pid for pid in pids if alive(pid)]


class Launcher:
    """`python -m lepton.server` on free loopback ports, with its process tree."""

    def __init__(self, model_dir, tmp_path, stop_timeout: float = 5.0) -> None:
        self.ports = [free_port(), free_port(), free_port(), free_port()]
        self.log = open(tmp_path / "launcher.log", "w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "lepton.server", "--model", str(model_dir),
             "--http-port", str(self.ports[0]), "--grpc-port", str(self.ports[1]),
             "--metrics-port", str(self.ports[2]), "--api-port", str(self.ports[3]),
             "--stop-timeout", str(stop_timeout)],
            cwd=PROJECT_ROOT, stdout=self.log, stderr=subprocess.STDOUT,
        )
        self.wait_ready()
        self.triton = descendants(self.process.pid)[0]
        self.stubs = descendants(self.triton)
        assert self.stubs, "no backend stub process under tritonserver"

    def wait_ready(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        url = f"http://127.0.0.1:{self.ports[0]}/v2/health/ready"
        while time.monotonic() < deadline:
            assert self.process.poll() is None, open(self.log.name).read()[-3000:]
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    # NOTE: and the launcher is done starting (the OpenAI API comes up after Triton)
                    if response.status == 200 and "Lepton is ready" in open(self.log.name).read():
                        return
            except OSError:
                pass
            time.sleep(0.25)
        raise TimeoutError("launcher not ready")

    def all_pids(self) -> list[int]:
        return [self.process.pid, self.triton, *self.stubs]

    def cleanup(self) -> None:
        for pid in self.all_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.process.wait(10)
        self.log.close()


@pytest.fixture
def launcher(demo_model_dir, tmp_path):
    started = Launcher(demo_model_dir, tmp_path)
    yield started
    started.cleanup()


def test_10_killing_the_launcher_hard_takes_tritonserver_and_its_stubs(launcher):
    launcher.process.kill()
    launcher.process.wait(10)
    assert wait_gone([launcher.triton, *launcher.stubs], timeout=20) == []
    assert not any(port_in_use("127.0.0.1", port) for port in launcher.ports)


def test_10_a_dead_tritonserver_takes_its_stubs_even_stuck_ones(launcher):
    # NOTE: stopped stubs run no thread at all, as stubs stuck on locks do: only a watcher process can
    # end them (seen once in about a dozen kills of a replica under load).
    for stub in launcher.stubs:
        if "triton_python" in open(f"/proc/{stub}/comm").read():
            os.kill(stub, signal.SIGSTOP)
    os.kill(launcher.triton, signal.SIGKILL)
    assert wait_gone(launcher.stubs, timeout=20) == []
    assert launcher.process.wait(30) != 0


def test_9_sigterm_stops_a_stuck_engine_in_bounded_time(launcher):
    for stub in launcher.stubs:  # NOTE: a stub that answers nothing: the model is stuck
        os.kill(stub, signal.SIGSTOP)
    started = time.monotonic()
    launcher.process.send_signal(signal.SIGTERM)
    launcher.process.wait(30)
    assert time.monotonic() - started < 30
    assert wait_gone(launcher.all_pids(), timeout=10) == []
    assert not any(port_in_use("127.0.0.1", port) for port in launcher.ports)


def test_10_a_taken_port_is_reported_clearly(demo_model_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "lepton.server", "--model", str(demo_model_dir), "--http-port", str(port),
             "--grpc-port", str(free_port()), "--metrics-port", str(free_port()), "--api-port", "0"],
            cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120,
        )
    assert result.returncode != 0
    assert f"the HTTP port 127.0.0.1:{port} is already in use" in result.stderr, result.stderr

"""The launcher, tritonserver and the backend stubs live and die together (issue 12, defects 9 and 10).

Each test starts `python -m lepton.server` as `make serve` does and checks what is left after a
hard kill or a stop with a stuck model: no process, no port; and the name the OpenAI API serves under.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from launcher import Launcher, wait_gone
from tests.conftest import free_port
from lepton.lifetime import port_in_use
from lepton.server import PROJECT_ROOT

pytestmark = pytest.mark.e2e


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


def served_models(launcher) -> list[str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{launcher.ports[3]}/v1/models", timeout=10) as response:
        return [m["id"] for m in json.loads(response.read())["data"]]


def test_the_api_name_is_the_model_folder_whichever_configuration_auto_serves(demo_model_dir, tmp_path):
    # NOTE: --auto may serve an export of the folder (build/onnx/...); clients keep the folder's name.
    started = Launcher(demo_model_dir, tmp_path, extra_args=("--auto",))
    try:
        log = open(started.log.name).read()
        assert "[auto] chose" in log
        assert served_models(started) == [demo_model_dir.name]
    finally:
        started.cleanup()


def test_served_model_name_names_the_model_for_api_clients(demo_model_dir, tmp_path):
    started = Launcher(demo_model_dir, tmp_path, extra_args=("--served-model-name", "chat-small"))
    try:
        assert served_models(started) == ["chat-small"]
    finally:
        started.cleanup()

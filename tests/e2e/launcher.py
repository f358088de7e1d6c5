"""The launcher (`python -m lepton.server`, as `make serve` starts it) as a subprocess, with its process tree."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request

from tests.conftest import free_port
from lepton.lifetime import descendants
from lepton.server import PROJECT_ROOT


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


def is_tritonserver(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            return cmdline.read().split(b"\0")[0].endswith(b"/tritonserver")
    except OSError:
        return False


class Launcher:
    """`python -m lepton.server` on free loopback ports, with its process tree."""

    def __init__(self, model_dir, tmp_path, stop_timeout: float = 5.0, extra_args: tuple[str, ...] = ()) -> None:
        self.ports = [free_port(), free_port(), free_port(), free_port()]
        self.log = open(tmp_path / "launcher.log", "w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "lepton.server", "--model", str(model_dir),
             "--http-port", str(self.ports[0]), "--grpc-port", str(self.ports[1]),
             "--metrics-port", str(self.ports[2]), "--api-port", str(self.ports[3]),
             "--stop-timeout", str(stop_timeout), *extra_args],
            cwd=PROJECT_ROOT, stdout=self.log, stderr=subprocess.STDOUT,
        )
        self.wait_ready()
        # NOTE: not the first child: --auto leaves multiprocessing's resource tracker beside tritonserver.
        self.triton = next(pid for pid in descendants(self.process.pid) if is_tritonserver(pid))
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

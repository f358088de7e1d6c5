"""Graceful shutdown: the launcher drains every engine through a file before tritonserver stops.

On SIGTERM the launcher (lepton/server.py) writes DRAIN_FILE into the served `lepton` model's
folder. Each engine instance watches for that file (DrainWatcher, in its backend stub): from then
on it refuses new requests with a clear "server shutting down" error (and says so with a marker
file, upon which the launcher makes Triton's readiness false), lets the running ones finish until
the deadline, cancels the rest (each ends with finish_reason `cancelled`), and writes a report of
what it did. Only then does the launcher stop tritonserver, which has no request in flight left.

A file, not a signal: the stub's main thread runs Triton's C++ loop, so a Python signal handler
would wait for the next request; and not a request through Triton either, which any client could send.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import subprocess
import threading
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # NOTE: the launcher imports this module without the engine
    from lepton.serving import DrainReport, EngineLoop

logger = logging.getLogger(__name__)

DRAIN_FILE = "drain.json"  # {"timeout_s": float}, written by the launcher
DRAINING_PREFIX = "draining-"  # + the instance name: written by each engine once it refuses new requests
DRAINED_PREFIX = "drained-"  # + the instance name + ".json": a DrainReport, written by each engine
POLL_INTERVAL_S = 0.05
CONTROL_KEY_HEADER = "lepton-control-key"  # NOTE: tritonserver restricts its model-repository API to it
# NOTE: a model that fails to load with a reason makes Triton's strict readiness false while the
# served models keep answering; a backend that does not exist fails at once (about 10 ms).
NOT_READY_MODEL = "shutting_down"


@dataclass(frozen=True)
class DrainAck:
    """One engine instance's DrainReport, as the launcher reads it back."""

    instance: str
    num_in_flight: int
    num_cancelled: int
    seconds: float


def num_engines(model_dir: Path) -> int:
    """Engine instances Triton starts for the model in model_dir (the instance groups of its config.pbtxt)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    config = text_format.Parse((model_dir / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    return sum(max(1, group.count) * max(1, len(group.gpus)) for group in config.instance_group) or 1


def request_drain(model_dir: Path, timeout_s: float) -> None:
    """Ask every engine serving model_dir to drain within timeout_s."""
    tmp = model_dir / f".{DRAIN_FILE}.tmp"
    tmp.write_text(json.dumps({"timeout_s": timeout_s}))
    os.replace(tmp, model_dir / DRAIN_FILE)  # NOTE: atomic: a watcher never reads half a file


def drain_acks(model_dir: Path) -> list[DrainAck]:
    """The acknowledgements written so far."""
    acks = []
    for path in sorted(model_dir.glob(f"{DRAINED_PREFIX}*.json")):
        report = json.loads(path.read_text())
        acks.append(DrainAck(instance=path.stem[len(DRAINED_PREFIX):], **report))
    return acks


def wait_for_files(model_dir: Path, prefix: str, num_instances: int, timeout_s: float,
                   server: subprocess.Popen) -> int:
    """Wait until num_instances engines wrote their prefix file, timeout_s passed or the server exited."""
    deadline = time.monotonic() + timeout_s
    while (found := len(list(model_dir.glob(f"{prefix}*")))) < num_instances:
        if time.monotonic() >= deadline or server.poll() is not None:
            break
        time.sleep(POLL_INTERVAL_S / 5)
    return found


def refuse_readiness(http_url: str, control_key: str) -> None:
    """Make Triton's /v2/health/ready false from now on (explicit model control must be on)."""
    # NOTE: plain urllib, not tritonclient: its import takes a noticeable part of a second, and its
    # kept-alive connection would hold tritonserver's exit up to the exit timeout.
    config = json.dumps({"name": NOT_READY_MODEL, "backend": NOT_READY_MODEL})
    body = {"parameters": {"config": config, "file:1/server-shutting-down": base64.b64encode(b"-").decode()}}
    request = urllib.request.Request(f"http://{http_url}/v2/repository/models/{NOT_READY_MODEL}/load",
                                     data=json.dumps(body).encode(), method="POST",
                                     headers={CONTROL_KEY_HEADER: control_key})
    try:
        urllib.request.urlopen(request, timeout=5).close()
    except urllib.error.HTTPError:
        pass  # NOTE: the load is meant to fail; that failure is what turns readiness off
    except OSError as exc:
        logger.warning("could not turn readiness off: %s", exc)


class DrainWatcher:
    """In a backend stub: drains engine_loop once the launcher asks (see the module docstring)."""

    def __init__(self, model_dir: Path, instance_name: str, engine_loop: EngineLoop) -> None:
        self.model_dir, self.instance_name, self.engine_loop = model_dir, instance_name, engine_loop
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lepton-drain-watcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()

    def _run(self) -> None:
        request = self.model_dir / DRAIN_FILE
        while not request.exists():
            if self._stopped.wait(POLL_INTERVAL_S):
                return
        timeout_s = float(json.loads(request.read_text())["timeout_s"])
        self.engine_loop.drain(timeout_s)
        (self.model_dir / f"{DRAINING_PREFIX}{self.instance_name}").touch()
        report: DrainReport | None = None
        while report is None and not self._stopped.is_set():
            report = self.engine_loop.wait_drained(POLL_INTERVAL_S)
        if report is not None:
            tmp = self.model_dir / f".{DRAINED_PREFIX}{self.instance_name}.tmp"
            tmp.write_text(json.dumps(asdict(report)))
            os.replace(tmp, self.model_dir / f"{DRAINED_PREFIX}{self.instance_name}.json")

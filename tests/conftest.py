"""Shared fixtures: the demo model folder and one real tritonserver per test session."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from lepton.server import PROJECT_ROOT, ServerOptions, TritonServer

DEMO_MODEL = PROJECT_ROOT / "build" / "models" / "demo"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def demo_model_dir() -> Path:
    """The demo model; built here when `make test` did not build it already."""
    if not (DEMO_MODEL / "config.json").is_file():
        from export.demo_model import build_demo_model

        build_demo_model(DEMO_MODEL)
    return DEMO_MODEL


def start_server(model_dir: Path, work_dir: Path, engine_parameters: dict[str, str], **options) -> TritonServer:
    """A real tritonserver on free loopback ports (options: more ServerOptions); its log is printed if it fails to start."""
    options = ServerOptions(
        model_dir=model_dir, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(),
        work_dir=work_dir, engine_parameters=engine_parameters, **options,
    )
    log_file = work_dir / "tritonserver.log"
    triton = TritonServer(options, log_file=log_file)
    try:
        return triton.start()
    except Exception:
        print(log_file.read_text()[-5000:] if log_file.exists() else "(no log)")
        raise


@pytest.fixture(scope="session")
def server(demo_model_dir, tmp_path_factory) -> TritonServer:
    """A real tritonserver on free loopback ports serving the demo model."""
    # NOTE: a small queue so the "server busy" test can fill it without a long wait.
    triton = start_server(demo_model_dir, tmp_path_factory.mktemp("triton"),
                          {"max_queue_size": "8", "max_num_seqs": "16", "kv_cache_memory_bytes": "64M"})
    yield triton
    triton.stop()


@pytest.fixture(scope="session")
def load_server(demo_model_dir, tmp_path_factory) -> TritonServer:
    """A second demo-model server with room for load: 64 sequences at once, 1,024 waiting (storm, soak)."""
    triton = start_server(demo_model_dir, tmp_path_factory.mktemp("triton-load"),
                          {"max_queue_size": "1024", "max_num_seqs": "64", "kv_cache_memory_bytes": "64M"})
    yield triton
    triton.stop()


@pytest.fixture(scope="session")
def start_triton():
    """start_server, for tests that need a server of their own (another model or runner)."""
    return start_server

"""`python -m client` against a real tritonserver serving the demo model."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys

import pytest

from lepton.server import PROJECT_ROOT, ServerOptions, TritonServer

MODEL_DIR = PROJECT_ROOT / "build" / "models" / "demo"
PROMPT = "def read_file(path):"
GREEDY = ("--temperature", "0", "--max-tokens", "24", "--ignore-eos")
CLI_TIMEOUT_S = 60

pytestmark = pytest.mark.e2e


def free_port() -> int:
    """A TCP port nothing listens on right now (bind to port 0 on loopback)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> TritonServer:
    """One tritonserver on free loopback ports for the whole module."""
    if not (MODEL_DIR / "config.json").is_file():
        pytest.fail(f"demo model missing at {MODEL_DIR}; build it with `make demo-model`")
    work = tmp_path_factory.mktemp("triton")
    options = ServerOptions(
        model_dir=MODEL_DIR, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(),
        work_dir=work,
    )
    with TritonServer(options, log_file=work / "tritonserver.log") as running:
        yield running


def cli(*args: str) -> subprocess.CompletedProcess:
    """Run `python -m client ARGS` and capture its output."""
    return subprocess.run(
        [sys.executable, "-m", "client", *args], cwd=PROJECT_ROOT, capture_output=True, text=True,
        timeout=CLI_TIMEOUT_S,
    )


def generate(server: TritonServer, protocol: str, *args: str) -> subprocess.CompletedProcess:
    """`client generate PROMPT` over protocol at the server's address for it."""
    url = server.grpc_url if protocol == "grpc" else server.http_url
    return cli("generate", PROMPT, "--protocol", protocol, "--url", url, *args)


def completion(server: TritonServer, protocol: str, *args: str) -> str:
    """The greedy completion's stdout; fails the test on a non-zero exit."""
    result = generate(server, protocol, *GREEDY, *args)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return result.stdout


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_health_is_ok(server, protocol):
    url = server.grpc_url if protocol == "grpc" else server.http_url
    result = cli("health", "--protocol", protocol, "--url", url)
    assert result.returncode == 0, result.stdout + result.stderr
    for check in ("server live: yes", "server ready: yes", "model 'lepton' ready: yes"):
        assert check in result.stdout


def test_health_of_unknown_model_fails(server):
    result = cli("health", "--url", server.grpc_url, "--model", "no_such_model")
    assert result.returncode == 1
    assert "model 'no_such_model' ready: no" in result.stdout


def test_grpc_stream_and_single_response_agree(server):
    streamed = completion(server, "grpc", "--stream")
    single = completion(server, "grpc")
    assert streamed.strip(), "empty completion"
    assert streamed == single


def test_http_generate_and_generate_stream_match_grpc(server):
    expected = completion(server, "grpc")
    assert completion(server, "http") == expected
    assert completion(server, "http", "--stream") == expected


def test_summary_line_on_stderr(server):
    result = generate(server, "grpc", *GREEDY, "--stream")
    assert result.returncode == 0, result.stderr
    summary = result.stderr.strip().splitlines()[-1]
    assert "finish_reason=length" in summary
    assert "output_tokens=24" in summary
    assert "ttft_ms=" in summary and "tokens_per_s=" in summary


@pytest.mark.parametrize("protocol", ["grpc", "http"])
@pytest.mark.parametrize("stream", [False, True])
def test_invalid_request_prints_the_server_error(server, protocol, stream):
    result = generate(server, protocol, "--max-tokens", "0", *(["--stream"] if stream else []))
    assert result.returncode == 1
    assert result.stderr.startswith("error: "), result.stderr
    assert "max_tokens" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_unreachable_server_is_an_error_not_a_traceback(protocol):
    url = f"127.0.0.1:{free_port()}"
    result = cli("generate", PROMPT, "--protocol", protocol, "--url", url, "--timeout", "10")
    assert result.returncode == 1
    assert result.stderr.startswith("error: cannot reach"), result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_ctrl_c_cancels_the_stream_and_exits_130(server, protocol):
    url = server.grpc_url if protocol == "grpc" else server.http_url
    process = subprocess.Popen(
        [sys.executable, "-m", "client", "generate", PROMPT, "--stream", "--ignore-eos", "--max-tokens", "900",
         "--protocol", protocol, "--url", url],
        cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        # NOTE: a shell without job control starts background jobs with SIGINT ignored; undo that.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        assert process.stdout.read(1), "no text before the interrupt"
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=CLI_TIMEOUT_S)
    finally:
        process.kill()
    assert process.returncode == 130, stderr
    assert b"cancelled after" in stderr and b"Traceback" not in stderr


def test_help_runs_without_a_server():
    for command in ([], ["generate"], ["health"]):
        result = cli(*command, "--help")
        assert result.returncode == 0, result.stderr
        assert "usage: python -m client" in result.stdout

"""SIGTERM under load: a drain, then an exit with nothing left behind (issue 11, item 4).

`python -m lepton.server --drain-timeout 2` serves a model with eight gRPC streams running when
it gets SIGTERM: four long ones (1,000 tokens) and four short ones (about a second of tokens,
sized from the speed measured on the long ones). The model is the demo model made twice as deep
and four times as wide (random weights): the demo itself decodes so fast on a quiet machine that
a 1,000-token stream could end within the drain. At once new requests are
refused with "server shutting down" (gRPC, HTTP generate, HTTP infer, the OpenAI API) and
readiness turns false. The short streams finish with finish_reason `length`; the long ones end
with a final `cancelled` response at the deadline. Then tritonserver stops: its ports close (a
request gets connection refused) and the launcher exits 0 with no process of its tree left.
"""

from __future__ import annotations

import json
import shutil
import signal
import threading
import time
import urllib.error
import urllib.request

import pytest
import tritonclient.grpc as grpcclient

from launcher import Launcher, wait_gone
from lepton.lifetime import descendants, port_in_use
from tritonio import grpc_generate, http_post, make_inputs

pytestmark = pytest.mark.e2e

DRAIN_S = 2.0
LONG_TOKENS = 1000


class Stream:
    """One streamed request over gRPC; records (time, num_output_tokens, finish_reason) per response."""

    def __init__(self, grpc_url: str, max_tokens: int) -> None:
        self.responses: list[tuple[float, int, str]] = []
        self.error: Exception | None = None
        self.done = threading.Event()
        self.client = grpcclient.InferenceServerClient(grpc_url)
        self.client.start_stream(callback=self._on_response)
        fields = {"text_input": "The quick brown fox", "stream": True, "max_tokens": max_tokens,
                  "ignore_eos": True, "temperature": 0.0}
        self.client.async_stream_infer("lepton", make_inputs(fields), enable_empty_final_response=True)

    def _on_response(self, result, error) -> None:
        if self.done.is_set():
            return  # NOTE: close() cancels the finished stream; that is not the request's error
        if error is not None:
            self.error = error
            self.done.set()
            return
        if result.as_numpy("num_output_tokens") is not None:
            self.responses.append((time.monotonic(), int(result.as_numpy("num_output_tokens")[0]),
                                   result.as_numpy("finish_reason")[0].decode()))
        if result.get_response().parameters["triton_final_response"].bool_param:
            self.done.set()

    def tokens_at(self, when: float) -> int:
        return max((n for t, n, _ in self.responses if t <= when), default=0)

    def wait_tokens(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.responses:
            assert self.error is None and time.monotonic() < deadline, f"no token: {self.error}"
            time.sleep(0.01)

    def close(self) -> None:
        self.client.stop_stream()
        self.client.close()


def http_status(url: str, method: str = "GET", body: dict | None = None) -> tuple[int, str]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest.fixture(scope="module")
def slow_model(demo_model_dir, tmp_path_factory):
    """The demo tokenizer on a 28M-parameter Llama with seeded random weights."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    out = tmp_path_factory.mktemp("slow_model")
    config = LlamaConfig(vocab_size=json.loads((demo_model_dir / "config.json").read_text())["vocab_size"],
                         hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                         num_key_value_heads=4, max_position_embeddings=1024, tie_word_embeddings=True)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy2(demo_model_dir / name, out / name)
    return out


@pytest.fixture
def launcher(slow_model, tmp_path):
    started = Launcher(slow_model, tmp_path, stop_timeout=10, extra_args=("--drain-timeout", str(DRAIN_S)))
    yield started
    started.cleanup()


def test_sigterm_drains_running_requests_refuses_new_ones_and_exits_clean(launcher):
    http, grpc_url, api = (f"127.0.0.1:{port}" for port in (launcher.ports[0], launcher.ports[1], launcher.ports[3]))
    tree = [launcher.process.pid, *descendants(launcher.process.pid)]
    # NOTE: the drain needs explicit model control; no client but the launcher may load or unload a model
    status, text = http_post(http, "/v2/repository/models/lepton/unload", {})
    assert status == 403 and "lepton-control-key" in text
    longs = [Stream(grpc_url, LONG_TOKENS) for _ in range(4)]
    for stream in longs:
        stream.wait_tokens()
    started, first = time.monotonic(), min(stream.tokens_at(time.monotonic()) for stream in longs)
    time.sleep(1.0)
    now = time.monotonic()
    per_second = (min(stream.tokens_at(now) for stream in longs) - first) / (now - started)
    left = LONG_TOKENS - max(stream.tokens_at(now) for stream in longs)
    assert per_second * (DRAIN_S + 0.8) < left, f"{per_second:.0f} tokens/s: the long streams could end in the drain"
    short_tokens = max(8, int(per_second * 0.8))
    shorts = [Stream(grpc_url, short_tokens) for _ in range(4)]
    for stream in shorts:
        stream.wait_tokens()

    sigterm = time.monotonic()
    launcher.process.send_signal(signal.SIGTERM)
    while http_status(f"http://{http}/v2/health/ready")[0] == 200:
        assert time.monotonic() - sigterm < 1.0, "readiness still true 1 s after SIGTERM"
        time.sleep(0.02)
    not_ready = time.monotonic()  # NOTE: by now every engine refuses new requests
    assert http_status(f"http://{api}/health")[0] == 503

    # NOTE: new requests while the long streams still run: each refused, each saying why.
    with pytest.raises(Exception, match="server shutting down: not accepting new requests"):
        grpc_generate(grpc_url, {"text_input": "Hello", "max_tokens": 4})
    status, text = http_post(http, "/v2/models/lepton/generate", {"text_input": "Hello", "max_tokens": 4})
    assert status == 400 and "server shutting down" in text  # NOTE: Triton's generate answers 400 to any model error
    status, text = http_post(http, "/v2/models/lepton_infer/infer", {"inputs": [
        {"name": "text_input", "shape": [1], "datatype": "BYTES", "data": ["Hello"]}]})
    assert status == 503 and "server shutting down" in text
    status, text = http_status(f"http://{api}/v1/completions", "POST", {"model": "any", "prompt": "Hi"})
    assert status == 503 and json.loads(text)["error"]["code"] == "server_shutting_down"
    assert time.monotonic() - sigterm < DRAIN_S and not any(stream.done.is_set() for stream in longs)

    for stream in shorts + longs:
        assert stream.done.wait(DRAIN_S + 30), "a stream never ended"
        stream.close()
        assert stream.error is None, stream.error
    for stream in shorts:
        assert stream.tokens_at(not_ready) < short_tokens  # NOTE: still running when the drain began
        assert stream.responses[-1][1:] == (short_tokens, "length")
    for stream in longs:
        ended, num_tokens, reason = stream.responses[-1]
        assert reason == "cancelled" and num_tokens < LONG_TOKENS
        assert ended - sigterm >= DRAIN_S - 0.1  # NOTE: cancelled at the deadline, not before

    assert launcher.process.wait(30) == 0
    assert wait_gone(tree, timeout=10) == []
    assert not any(port_in_use("127.0.0.1", port) for port in launcher.ports)
    with pytest.raises(urllib.error.URLError, match="Connection refused"):
        urllib.request.urlopen(f"http://{http}/v2/health/live", timeout=5)
    log = open(launcher.log.name).read()
    assert "8 requests were in flight, 4 finished, 4 cancelled at the deadline" in log, log[-3000:]

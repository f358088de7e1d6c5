"""The OpenAI-compatible API (openai_api/) against a real tritonserver, with the official `openai` client
and raw HTTP (httpx) for what a well-behaved client never sends."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import httpx
import openai
import pytest
import tritonclient.grpc as grpcclient
from tokenizers import Tokenizer

from client.metrics import scrape as metrics
from client.metrics import wait_idle as wait_idle_at
from openai_api.config import ApiConfig
from openai_api.errors import from_triton_message
from openai_api.logprobs import TokenTexts
from openai_api.server import ApiServer
from tritonio import grpc_generate

pytestmark = pytest.mark.e2e

PROMPT = "The quick brown fox"
MESSAGES = [{"role": "system", "content": "You answer briefly."},
            {"role": "user", "content": "What is the capital of France?"}]
API_KEY = "test-key-0123"
LONG = {"max_tokens": 900, "extra_body": {"ignore_eos": True}}  # tens of seconds of tokens at least


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_api(server, **options) -> ApiServer:
    config = ApiConfig(port=free_port(), triton_url=server.grpc_url, log_level="warning", **options)
    return ApiServer(config).start()


@pytest.fixture(scope="module")
def api(server):
    api = start_api(server)
    yield api
    api.stop()


@pytest.fixture(scope="module")
def keyed_api(server):
    api = start_api(server, api_key=API_KEY)
    yield api
    api.stop()


@pytest.fixture
def client(api):
    return openai.OpenAI(base_url=api.url, api_key="unused", max_retries=0, timeout=60)


@pytest.fixture
def aclient(api):
    return openai.AsyncOpenAI(base_url=api.url, api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def has_chat(server) -> bool:
    triton = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        config = triton.get_model_config("lepton", as_json=True)["config"]
    finally:
        triton.close()
    return any(i["name"] == "messages" for i in config["input"])


@pytest.fixture
def chat(has_chat):
    if not has_chat:
        pytest.skip("the Triton model `lepton` has no `messages` input yet (issue 8, item 2)")


@pytest.fixture(scope="module")
def tokenizer(demo_model_dir) -> Tokenizer:
    return Tokenizer.from_file(str(demo_model_dir / "tokenizer.json"))


def wait_idle(server, timeout: float = 20.0) -> dict[str, float]:
    """Poll the server's metrics until no request runs or waits and no KV block is held."""
    return wait_idle_at(server.metrics_url, timeout, poll_s=0.05)


def streamed_text(chunks, chat: bool) -> tuple[str, str | None, list]:
    """(text, finish_reason, chunks) of a stream of chunks."""
    chunks = list(chunks)
    text = "".join((c.choices[0].delta.content or "") if chat else c.choices[0].text
                   for c in chunks if c.choices)
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(reasons) <= 1
    return text, reasons[0] if reasons else None, chunks


# --- pure pieces (no server) ---------------------------------------------------------------------

@pytest.mark.parametrize("message,status,param", [
    ("max_tokens: must be >= 1, got 0", 400, "max_tokens"),
    ("[request id: cmpl-1] top_p: must be > 0.0, got 0.0", 400, "top_p"),
    ("messages[2].role: must be one of system, user", 400, "messages"),
    ("text_input: the prompt is empty", 400, "prompt"),
    ("unexpected inference input 'x' for model 'lepton'", 400, None),
    ("server busy: the waiting queue is full (8); retry later", 503, None),
    ("internal error: the runner failed", 500, None),
    ("Stub process 'lepton_0_0' is not healthy.", 500, None),
])
def test_triton_error_messages_map_to_openai_statuses(message, status, param):
    error = from_triton_message(message)
    assert (error.status, error.param) == (status, param) and not error.message.startswith("[request id")


def test_logprob_tokens_carry_the_exact_bytes_of_byte_level_tokens(tokenizer):
    tokens, text = TokenTexts(tokenizer), "naïve café — 東京 ok"
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    assert b"".join(bytes(tokens.get(i)[1]) for i in ids).decode() == text
    assert TokenTexts().get(42) == ("token_id:42", list(b"token_id:42"))


# --- models, health ------------------------------------------------------------------------------

def test_models_lists_the_served_folder_and_health_answers(api, client, demo_model_dir):
    models = client.models.list().data
    assert [m.id for m in models] == [demo_model_dir.name] and models[0].object == "model"
    assert client.models.retrieve(demo_model_dir.name).id == demo_model_dir.name
    assert httpx.get(api.url.removesuffix("/v1") + "/health").json() == {"status": "ok"}


# --- completions ---------------------------------------------------------------------------------

def test_completion_equals_triton_and_counts_its_tokens(server, api, client, tokenizer):
    started = int(time.time())
    completion = client.completions.create(model=api.model, prompt=PROMPT, max_tokens=16, temperature=0,
                                           logprobs=0)
    direct = grpc_generate(server.grpc_url, {"text_input": PROMPT, "max_tokens": 16, "temperature": 0.0,
                                             "exclude_input_in_output": True})
    choice = completion.choices[0]
    assert choice.text == direct.text and choice.finish_reason == "length"
    assert completion.id.startswith("cmpl-") and completion.object == "text_completion"
    assert completion.model == api.model and started - 1 <= completion.created <= time.time() + 1
    usage = completion.usage
    assert usage.prompt_tokens == len(tokenizer.encode(PROMPT).ids) == direct.num_input_tokens
    assert usage.completion_tokens == 16 == len(choice.logprobs.tokens) == len(choice.logprobs.token_logprobs)
    assert usage.total_tokens == usage.prompt_tokens + 16
    assert all(lp <= 0 for lp in choice.logprobs.token_logprobs)


def test_streamed_completion_equals_the_whole_one(api, client):
    whole = client.completions.create(model=api.model, prompt=PROMPT, max_tokens=24, temperature=0)
    stream = client.completions.create(model=api.model, prompt=PROMPT, max_tokens=24, temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    text, reason, chunks = streamed_text(stream, chat=False)
    assert text == whole.choices[0].text and reason == whole.choices[0].finish_reason == "length"
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("cmpl-")
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert all(c.usage is None for c in chunks[:-1])


def test_stop_strings_cut_the_text_and_finish_with_stop(api, client):
    full = client.completions.create(model=api.model, prompt=PROMPT, max_tokens=24, temperature=0).choices[0].text
    stop = full[6:9]  # NOTE: text the greedy continuation reaches after a few tokens
    expected = full[:full.index(stop)]
    assert expected
    for stops in (stop, [stop, "\x00never"]):
        cut = client.completions.create(model=api.model, prompt=PROMPT, max_tokens=24, temperature=0, stop=stops)
        assert cut.choices[0].text == expected and cut.choices[0].finish_reason == "stop"
        text, reason, _ = streamed_text(client.completions.create(
            model=api.model, prompt=PROMPT, max_tokens=24, temperature=0, stop=stops, stream=True), chat=False)
        assert (text, reason) == (expected, "stop")


def test_seed_makes_sampling_reproducible_and_extensions_pass(api, client):
    def sample(seed):
        return client.completions.create(model=api.model, prompt=PROMPT, max_tokens=12, temperature=1.0, top_p=0.9,
                                         seed=seed, presence_penalty=0.5, frequency_penalty=0.1, user="someone",
                                         extra_body={"top_k": 50, "repetition_penalty": 1.1, "min_tokens": 12,
                                                     "ignore_eos": True}).choices[0]
    first, again = sample(7), sample(7)
    assert first.text == again.text and first.finish_reason == "length"


def test_async_client_streams_and_not(api, aclient):
    async def both():
        whole = await aclient.completions.create(model=api.model, prompt=PROMPT, max_tokens=20, temperature=0)
        stream = await aclient.completions.create(model=api.model, prompt=PROMPT, max_tokens=20, temperature=0,
                                                  stream=True)
        return whole, "".join([c.choices[0].text async for c in stream])

    whole, text = asyncio.run(both())
    assert text == whole.choices[0].text and whole.usage.completion_tokens == 20


# --- chat ----------------------------------------------------------------------------------------

def test_chat_streamed_equals_non_streamed_under_greedy(chat, api, client):
    whole = client.chat.completions.create(model=api.model, messages=MESSAGES, max_completion_tokens=32,
                                           temperature=0)
    stream = client.chat.completions.create(model=api.model, messages=MESSAGES, max_completion_tokens=32,
                                            temperature=0, stream=True, stream_options={"include_usage": True})
    text, reason, chunks = streamed_text(stream, chat=True)
    message = whole.choices[0].message
    assert message.role == "assistant" and text == message.content and reason == whole.choices[0].finish_reason
    assert whole.id.startswith("chatcmpl-") and whole.object == "chat.completion" and whole.model == api.model
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].object == "chat.completion.chunk"
    assert chunks[-1].usage == whole.usage and whole.usage.completion_tokens <= 32


def test_chat_logprobs_and_usage_match_the_tokens(chat, api, client):
    whole = client.chat.completions.create(model=api.model, messages=MESSAGES, max_tokens=12, temperature=0,
                                           logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True})
    content = whole.choices[0].logprobs.content
    assert whole.usage.completion_tokens == 12 == len(content) and whole.choices[0].finish_reason == "length"
    assert b"".join(bytes(t.bytes) for t in content).decode("utf-8", "replace") == whole.choices[0].message.content
    for token in content:
        assert len(token.top_logprobs) == 3 and token.top_logprobs[0].logprob >= token.logprob - 1e-5
    stream = client.chat.completions.create(model=api.model, messages=MESSAGES, max_tokens=12, temperature=0,
                                            logprobs=True, stream=True, extra_body={"ignore_eos": True})
    streamed = [t for c in stream if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [(t.token, t.logprob) for t in streamed] == [(t.token, t.logprob) for t in content]


def test_sixteen_concurrent_chat_streams_all_complete(chat, server, api, aclient):
    async def one(i: int) -> tuple[str, str, int]:
        stream = await aclient.chat.completions.create(
            model=api.model, messages=[{"role": "user", "content": f"Question number {i}?"}], max_tokens=24 + i,
            temperature=0, stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        text, reason, usage = "", None, None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                reason = chunk.choices[0].finish_reason or reason
            usage = chunk.usage or usage
        return text, reason, usage.completion_tokens

    async def all_of_them():
        return await asyncio.gather(*(one(i) for i in range(16)))

    results = asyncio.run(all_of_them())
    assert [(r[1], r[2]) for r in results] == [("length", 24 + i) for i in range(16)]
    wait_idle(server)


# --- errors --------------------------------------------------------------------------------------

def test_n_other_than_one_is_a_clear_400(api, client):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=api.model, prompt=PROMPT, n=2)
    assert info.value.status_code == 400 and info.value.param == "n" and "n=1" in info.value.message


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="gpt-4o", prompt=PROMPT)
    assert info.value.code == "model_not_found" and "gpt-4o" in info.value.message


def test_triton_invalid_arg_is_400_naming_the_field_streaming_or_not(api, client):
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as info:
            client.completions.create(model=api.model, prompt=PROMPT, max_tokens=5000, stream=stream)
        assert info.value.param == "max_tokens" and "context of 1024 tokens" in info.value.message
        with pytest.raises(openai.BadRequestError) as info:
            client.completions.create(model=api.model, prompt=PROMPT, top_p=0, stream=stream)
        assert info.value.param == "top_p"


def test_api_key_is_required_when_set(keyed_api):
    base = keyed_api.url
    with pytest.raises(openai.AuthenticationError) as info:
        openai.OpenAI(base_url=base, api_key="wrong", max_retries=0).models.list()
    assert info.value.status_code == 401 and info.value.code == "invalid_api_key"
    assert httpx.post(f"{base}/completions", json={"model": keyed_api.model, "prompt": "Hi"}).status_code == 401
    good = openai.OpenAI(base_url=base, api_key=API_KEY, max_retries=0)
    assert good.completions.create(model=keyed_api.model, prompt=PROMPT, max_tokens=2).usage.completion_tokens == 2
    assert httpx.get(base.removesuffix("/v1") + "/health").status_code == 200  # NOTE: open for probes


def test_body_too_large_is_413(api):
    body = json.dumps({"model": api.model, "prompt": "x" * (2 << 20)}).encode()
    response = httpx.post(f"{api.url}/completions", content=body, timeout=30)
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"
    chunked = httpx.post(f"{api.url}/completions", content=iter([body[:1 << 20], body[1 << 20:]]), timeout=30)
    assert chunked.status_code == 413  # NOTE: no Content-Length: counted while reading


@pytest.mark.parametrize("body,param,words", [
    (b'{"model": "demo", "prompt": "Hi"', None, ["not valid JSON"]),
    (b'[1, 2]', None, ["JSON object"]),
    (b'{"prompt": "Hi"}', "model", ["model", "required"]),
    (b'{"model": "demo", "prompt": "Hi", "max_tokens": "8"}', "max_tokens", ["max_tokens", "integer"]),
    (b'{"model": "demo", "prompt": "Hi", "temperature": true}', "temperature", ["temperature"]),
    (b'{"model": "demo", "prompt": "Hi", "stop": 5}', "stop", ["stop"]),
    (b'{"model": "demo", "prompt": "Hi", "max_token": 8}', "max_token", ["unrecognized"]),
    (b'{"model": "demo", "prompt": [1, 2, 3]}', "prompt", ["prompt"]),
    (b'{"model": "demo", "prompt": "Hi", "echo": true}', "echo", ["echo"]),
    (b'{"model": "demo", "prompt": "Hi", "stream_options": {"include_usage": true}}', "stream_options", ["stream"]),
    (b'{"model": "demo", "prompt": "Hi", "max_tokens": 0}', "max_tokens", ["max_tokens: must be >= 1, got 0"]),
    (b'{"model": "demo", "prompt": ""}', "prompt", ["prompt: the prompt is empty"]),
])
def test_bad_json_and_bad_fields_are_400_in_openai_format(api, demo_model_dir, body, param, words):
    response = httpx.post(f"{api.url}/completions", content=body.replace(b'"demo"', json.dumps(api.model).encode()))
    error = response.json()["error"]
    assert response.status_code == 400 and error["type"] == "invalid_request_error" and error["param"] == param
    for word in words:
        assert word in error["message"], error


@pytest.mark.parametrize("fields,param", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "Hi"}]}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages"),
    ({"messages": MESSAGES, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"messages": MESSAGES, "top_logprobs": 2}, "top_logprobs"),
    ({"messages": MESSAGES, "response_format": {"type": "json_object"}}, "response_format"),
])
def test_bad_chat_requests_are_400(chat, api, fields, param):
    response = httpx.post(f"{api.url}/chat/completions", json={"model": api.model, **fields})
    assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text


# --- cancellation and load -----------------------------------------------------------------------

def test_client_that_disconnects_mid_stream_leaves_nothing_running(server, api):
    wait_idle(server)
    before = metrics(server.metrics_url)["lepton_generated_tokens_total"]
    body = {"model": api.model, "prompt": "Once upon a time", "stream": True, "max_tokens": 900, "ignore_eos": True}
    with httpx.stream("POST", f"{api.url}/completions", json=body, timeout=30) as response:
        events = 0
        for line in response.iter_lines():
            events += line.startswith("data: ")
            if events == 3:
                break
    wait_idle(server, timeout=10)
    assert metrics(server.metrics_url)["lepton_generated_tokens_total"] - before < 900


def test_client_that_gives_up_on_a_whole_answer_cancels_it(server, api):
    wait_idle(server)
    before = metrics(server.metrics_url)["lepton_generated_tokens_total"]
    body = {"model": api.model, "prompt": "Once upon a time", "max_tokens": 1000, "ignore_eos": True}
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{api.url}/completions", json=body, timeout=0.5)
    values = wait_idle(server, timeout=10)
    assert values["lepton_generated_tokens_total"] - before < 1000  # NOTE: cut short, not run to the end


def test_a_full_queue_answers_503_and_the_server_recovers(server, api):
    """The fixture's Triton runs 16 sequences and queues 8; more at once are refused as busy."""
    wait_idle(server)
    body = {"model": api.model, "prompt": "Once upon a time", "stream": True, "max_tokens": 900, "ignore_eos": True}
    num_requests, expected_busy = 30, 30 - 16 - 8

    async def flood() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=api.url, timeout=60) as http:
            async def open_stream() -> httpx.Response:
                response = await http.send(http.build_request("POST", "/completions", json=body), stream=True)
                if response.status_code != 200:
                    await response.aread()
                return response

            tasks = [asyncio.ensure_future(open_stream()) for _ in range(num_requests)]
            busy, deadline = [], time.monotonic() + 30
            while len(busy) < expected_busy and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
                busy = [t.result() for t in tasks if t.done() and t.result().status_code == 503]
            for task in tasks:  # NOTE: streams closed, waiting requests abandoned: all cancelled in Triton
                task.cancel()
            for task in tasks:
                if task.done() and not task.cancelled():
                    await task.result().aclose()
            return busy

    busy = asyncio.run(flood())
    assert len(busy) >= expected_busy
    assert busy[0].json()["error"]["code"] == "server_busy" and busy[0].headers["retry-after"] == "1"
    wait_idle(server, timeout=30)
    client = openai.OpenAI(base_url=api.url, api_key="unused", max_retries=0)
    assert client.completions.create(model=api.model, prompt=PROMPT, max_tokens=3).usage.completion_tokens == 3

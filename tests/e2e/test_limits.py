"""A server whose limits are configured (docs/configuration.md, "Request limits"): each refused request
names the field and the limit, over HTTP generate and gRPC, and the server keeps serving. It also streams a
response every 4 tokens (stream_interval)."""

from __future__ import annotations

import json

import pytest
from tritonclient.utils import InferenceServerException

from client.grpc_stream import stream_generate
from tritonio import grpc_generate, http_post

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

STREAM_INTERVAL = 4
LIMITS = {"max_request_bytes": "2K", "max_prompt_tokens": "40", "max_output_tokens": "32", "default_max_tokens": "16",
          "max_stop_strings": "2", "max_stop_string_chars": "8", "max_logprobs": "3", "max_queue_size": "4"}


@pytest.fixture(scope="module")
def server(demo_model_dir, tmp_path_factory, start_triton):
    triton = start_triton(demo_model_dir, tmp_path_factory.mktemp("limits"),
                          {**LIMITS, "kv_cache_memory_bytes": "16M", "stream_interval": str(STREAM_INTERVAL)},
                          serve_embeddings=False)
    yield triton
    triton.stop()


def refusal(server, fields: dict) -> str:
    status, text = http_post(server.http_url, "/v2/models/lepton/generate", fields)
    assert status == 400, text
    return json.loads(text)["error"]


@pytest.mark.parametrize("fields, error", [
    ({"text_input": "x" * 3000}, "text_input: the request's inputs are 30"),
    ({"text_input": "word " * 60}, "text_input: 6"),
    ({"text_input": "Hi", "max_tokens": 33}, "max_tokens: must be <= 32 (max_output_tokens), got 33"),
    ({"text_input": "Hi", "stop": ["a", "b", "c"]}, "stop: at most 2 stop strings, got 3"),
    ({"text_input": "Hi", "sampling_parameters": json.dumps({"stop": ["123456789"]})},
     "stop: each stop string must be 1..8 characters of text, got one of 9"),
    ({"text_input": "Hi", "sampling_parameters": json.dumps({"logprobs": 4})}, "logprobs: must be <= 3, got 4"),
])
def test_each_limit_names_its_field_and_the_server_keeps_serving(server, fields, error):
    message = refusal(server, fields)
    assert message.startswith(error), message
    if fields["text_input"].startswith("x"):
        assert "at most 2048 (max_request_bytes)" in message
    if fields["text_input"].startswith("word"):
        assert message.endswith("tokens, at most 40 (max_prompt_tokens)")
    reply = grpc_generate(server.grpc_url, {"text_input": "Hi", "max_tokens": 32, "ignore_eos": True,
                                            "stop": ["ab", "cd"]})
    assert reply.num_output_tokens <= 32 and reply.finish_reason in ("length", "stop")


def test_grpc_gets_the_same_error(server):
    with pytest.raises(InferenceServerException) as info:
        grpc_generate(server.grpc_url, {"text_input": "Hi", "max_tokens": 100})
    assert "max_tokens: must be <= 32 (max_output_tokens), got 100" in str(info.value)


def test_a_stream_gets_a_response_every_stream_interval_tokens(server):
    fields = {"text_input": "Once upon a time", "max_tokens": 30, "ignore_eos": True, "temperature": 0.0}
    chunks = list(stream_generate(server.grpc_url, "lepton", {**fields, "stream": True}))
    counts = [c.num_output_tokens for c in chunks]
    assert counts[0] == 1 and counts[-1] == 30 and chunks[-1].finish_reason == "length"
    # NOTE: after the first, each response carries stream_interval tokens (one whose text the detokenizer
    # still held carries more), the final one what is left
    assert all(b - a >= STREAM_INTERVAL for a, b in zip(counts[:-1], counts[1:-1])), counts
    assert len(chunks) <= 2 + (30 - 1) // STREAM_INTERVAL, counts
    whole = grpc_generate(server.grpc_url, {**fields, "exclude_input_in_output": True})
    assert "".join(c.text for c in chunks) == whole.text

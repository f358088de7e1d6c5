"""Bad input gets a clear error naming the field and the limit, and the server keeps serving."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tritonio import grpc_generate, http_post, make_inputs

pytestmark = pytest.mark.e2e

CONTEXT = 1024  # the demo model's max_position_embeddings

# (case id, request fields, words the error message must contain)
CASES = [
    ("missing_text_input", {"max_tokens": 4}, ["text_input", "missing"]),
    ("invalid_json", {"text_input": "Hi", "sampling_parameters": "{max_tokens: 4"}, ["sampling_parameters", "invalid JSON"]),
    ("json_not_object", {"text_input": "Hi", "sampling_parameters": "[1, 2]"}, ["sampling_parameters", "JSON object"]),
    ("unknown_key", {"text_input": "Hi", "sampling_parameters": json.dumps({"max_token": 4})}, ["sampling_parameters", "max_token"]),
    ("max_tokens_zero", {"text_input": "Hi", "max_tokens": 0}, ["max_tokens", ">= 1", "got 0"]),
    ("max_tokens_negative", {"text_input": "Hi", "max_tokens": -5}, ["max_tokens", ">= 1", "got -5"]),
    ("max_tokens_huge", {"text_input": "Hi", "max_tokens": 2_000_000_000}, ["max_tokens", str(CONTEXT)]),
    ("max_tokens_string_json", {"text_input": "Hi", "sampling_parameters": json.dumps({"max_tokens": "eight"})}, ["max_tokens", "integer"]),
    ("max_tokens_float_string_json", {"text_input": "Hi", "sampling_parameters": json.dumps({"max_tokens": "6.4"})}, ["max_tokens", "integer", "6.4"]),
    ("temperature_nan_string_json", {"text_input": "Hi", "sampling_parameters": json.dumps({"temperature": "nan"})}, ["temperature", "number"]),
    ("temperature_negative", {"text_input": "Hi", "temperature": -0.5}, ["temperature", ">= 0.0"]),
    ("top_p_zero", {"text_input": "Hi", "top_p": 0.0}, ["top_p", "> 0.0"]),
    ("top_p_above_one", {"text_input": "Hi", "top_p": 1.5}, ["top_p", "<= 1.0"]),
    ("top_k_negative", {"text_input": "Hi", "top_k": -1}, ["top_k", ">= 0"]),
    ("context_overflow", {"text_input": "word " * 900, "max_tokens": 200}, ["max_tokens", f"context of {CONTEXT}"]),
    ("empty_prompt", {"text_input": ""}, ["text_input", "empty"]),
    ("blank_prompt", {"text_input": "   \n "}, ["text_input", "empty"]),
    ("not_utf8", {"text_input": b"caf\xc3\x28 \xff"}, ["text_input", "UTF-8"]),
    ("min_tokens_above_max", {"text_input": "Hi", "max_tokens": 4, "min_tokens": 9}, ["min_tokens", "max_tokens"]),
    ("wrong_dtype", {"text_input": "Hi", "max_tokens": np.array([4.0], dtype=np.float32)}, ["max_tokens", "FP32", "INT32"]),
    ("wrong_shape", {"text_input": np.array([b"a", b"b"], dtype=np.object_)}, ["text_input", "shape"]),
]


def assert_healthy(server) -> None:
    reply = grpc_generate(server.grpc_url, {"text_input": "Hello", "max_tokens": 2, "ignore_eos": True})
    assert reply.num_output_tokens == 2


@pytest.mark.parametrize("fields,words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_grpc_bad_input_is_rejected_with_its_field(server, fields, words):
    with pytest.raises(InferenceServerException) as info:
        grpc_generate(server.grpc_url, fields)
    message = str(info.value)
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"
    assert_healthy(server)


@pytest.mark.parametrize("body,status,words", [
    ({"text_input": "Hi", "max_tokens": 0}, 400, ["max_tokens"]),
    ({"text_input": "Hi", "top_p": 2}, 400, ["top_p"]),
    ({"max_tokens": 3}, 400, ["text_input"]),
    ({"text_input": "Hi", "sampling_parameters": "{oops"}, 400, ["sampling_parameters"]),
])
def test_http_generate_bad_input_is_400(server, body, status, words):
    code, text = http_post(server.http_url, "/v2/models/lepton/generate", body)
    assert code == status, text
    for word in words:
        assert word in json.loads(text)["error"]
    assert_healthy(server)


def test_plain_infer_bad_input_keeps_the_error_code(server):
    client = httpclient.InferenceServerClient(server.http_url)
    with pytest.raises(InferenceServerException) as info:
        client.infer("lepton_infer", make_inputs({"text_input": "Hi", "max_tokens": 0}, protocol=httpclient))
    assert "max_tokens" in str(info.value) and info.value.status() == "400"
    assert_healthy(server)

"""The lepton model takes token ids (`input_ids`) instead of text, with clear errors."""

from __future__ import annotations

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from stageio import infer
from tritonio import grpc_generate

pytestmark = pytest.mark.e2e

CONTEXT = 1024  # NOTE: the demo model's max_position_embeddings
VOCAB = 4096  # NOTE: the demo model's vocab_size


def ids(*values) -> np.ndarray:
    return np.array(values, dtype=np.int32)


@pytest.mark.parametrize("stream", [False, True])
def test_token_ids_generate_what_their_text_generates(server, stream):
    tokens = infer(server.grpc_url, "tokenizer", {"text_input": ["The quick brown fox"]}, ("input_ids",))["input_ids"]
    fields = {"max_tokens": 16, "temperature": 0.0, "ignore_eos": True, "stream": stream,
              "exclude_input_in_output": True}
    from_text = grpc_generate(server.grpc_url, {"text_input": "The quick brown fox", **fields})
    from_ids = grpc_generate(server.grpc_url, {"input_ids": tokens[0], **fields})
    assert from_ids.texts == from_text.texts and from_ids.num_input_tokens == tokens.shape[1]


@pytest.mark.parametrize("fields,words", [
    ({"text_input": "Hi", "input_ids": ids(1, 2)}, ["input_ids", "not text_input and input_ids"]),
    ({"messages": '[{"role": "user", "content": "x"}]', "input_ids": ids(1)}, ["input_ids", "messages and input_ids"]),
    ({"input_ids": ids(1, VOCAB)}, ["input_ids", f"[0, {VOCAB})"]),
    ({"input_ids": ids(5, -3)}, ["input_ids", ">= 0", "-3"]),
    ({"input_ids": np.zeros(0, np.int32)}, ["input_ids", "empty"]),
    ({"input_ids": np.ones(CONTEXT, np.int32)}, ["input_ids", f"{CONTEXT} tokens", f"context is {CONTEXT}"]),
    ({"input_ids": np.ones(CONTEXT - 8, np.int32), "max_tokens": 16}, ["max_tokens", f"context of {CONTEXT}"]),
    ({"input_ids": np.array([1.0, 2.0], np.float32)}, ["input_ids", "FP32", "INT32"]),
])
def test_bad_token_ids_are_refused_naming_the_field(server, fields, words):
    with pytest.raises(InferenceServerException) as info:
        grpc_generate(server.grpc_url, fields)
    message = str(info.value)
    assert all(word in message for word in words), message
    reply = grpc_generate(server.grpc_url, {"input_ids": ids(1, 2, 3), "max_tokens": 2, "ignore_eos": True})
    assert reply.num_input_tokens == 3 and reply.num_output_tokens == 2

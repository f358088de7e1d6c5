"""The tokenizer model through the real server: the model's own ids and counts, decode, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException
from transformers import AutoTokenizer

from stageio import infer
from tritonio import grpc_generate

pytestmark = pytest.mark.e2e

TEXTS = ["Hello", "The quick brown fox jumps over the lazy dog.", "  spaces\tand\nnewlines  ",
         "caf\u00e9 \u2603 \U0001f600 \u4e2d\u6587", "def f(x):\n    return x * 2\n"]
MESSAGES = [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "What is a list?"}]


@pytest.fixture(scope="module")
def hf_tokenizer(demo_model_dir):
    return AutoTokenizer.from_pretrained(demo_model_dir)


def encode(server, texts):
    out = infer(server.grpc_url, "tokenizer", {"text_input": texts}, ("input_ids", "num_tokens"))
    return out["input_ids"], out["num_tokens"].reshape(-1)


def test_a_batch_of_texts_gives_the_tokenizers_own_ids_and_counts(server, hf_tokenizer):
    ids, counts = encode(server, TEXTS)
    expected = [hf_tokenizer(text)["input_ids"] for text in TEXTS]
    assert counts.tolist() == [len(e) for e in expected]
    assert ids.shape == (len(TEXTS), max(counts)) and ids.dtype == np.int32
    for row, count, want in zip(ids, counts, expected):
        assert row[:count].tolist() == want
        assert (row[count:] == -1).all()  # NOTE: padding is never a token id


def test_decode_round_trips_the_text(server, hf_tokenizer):
    ids, counts = encode(server, TEXTS)
    out = infer(server.grpc_url, "tokenizer", {"input_ids": ids, "num_tokens": counts.reshape(-1, 1)},
                ("text_output", "num_tokens"))
    assert [t.decode() for t in out["text_output"].reshape(-1)] == TEXTS
    # NOTE: the same as transformers' decode, special tokens kept when asked
    row = ids[1, : counts[1]]
    kept = infer(server.grpc_url, "tokenizer", {"input_ids": row.reshape(1, -1),
                                                "skip_special_tokens": np.array([[False]])}, ("text_output",))
    assert kept["text_output"][0, 0].decode() == hf_tokenizer.decode(row.tolist(), skip_special_tokens=False)


def test_messages_render_the_chat_template_as_transformers(server, hf_tokenizer):
    out = infer(server.grpc_url, "tokenizer", {"messages": [json.dumps(MESSAGES)]}, ("input_ids", "num_tokens"))
    expected = hf_tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)["input_ids"]
    assert out["input_ids"][0].tolist() == expected and out["num_tokens"][0, 0] == len(expected)


def test_the_count_is_the_engines_prompt_count(server):
    _, counts = encode(server, TEXTS)
    for text, count in zip(TEXTS, counts):
        reply = grpc_generate(server.grpc_url, {"text_input": text, "max_tokens": 1, "temperature": 0.0})
        assert reply.num_input_tokens == count
    out = infer(server.grpc_url, "tokenizer", {"messages": [json.dumps(MESSAGES)]}, ("num_tokens",))
    reply = grpc_generate(server.grpc_url, {"messages": json.dumps(MESSAGES), "max_tokens": 1})
    assert reply.num_input_tokens == out["num_tokens"][0, 0]


@pytest.mark.parametrize("inputs,words", [
    ({"text_input": ["a"], "input_ids": np.array([[1, 2]], np.int32)}, ["text_input", "input_ids", "exactly one"]),
    ({"input_ids": np.array([[1, 10 ** 6]], np.int32)}, ["input_ids", "must be in [0,"]),
    ({"input_ids": np.array([[1, -1]], np.int32)}, ["input_ids", "got -1"]),
    ({"input_ids": np.array([[1, 2]], np.int32), "num_tokens": np.array([[3]], np.int32)}, ["num_tokens", "[0, 2]"]),
    ({"messages": ["not json"]}, ["messages", "invalid JSON"]),
    ({"messages": [json.dumps([{"role": "robot", "content": "x"}])]}, ["messages[0].role"]),
    ({"text_input": [b"caf\xc3\x28"]}, ["text_input", "UTF-8"]),
])
def test_bad_input_is_refused_naming_the_field(server, inputs, words):
    with pytest.raises(InferenceServerException) as info:
        infer(server.grpc_url, "tokenizer", inputs, ("num_tokens",))
    message = str(info.value)
    assert all(word in message for word in words), message
    assert encode(server, ["still serving"])[1][0] > 0

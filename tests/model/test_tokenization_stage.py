"""The tokenizer stage in process: a Triton batch of mixed requests, each answered on its own."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lepton.chat import parse_messages
from lepton.errors import InvalidRequest
from lepton.tokenization import PAD_ID, convert_batch, open_tokenizer

MESSAGES = [{"role": "user", "content": "What is a list?"}]


def column(*texts) -> np.ndarray:
    return np.array([[t.encode()] for t in texts], dtype=np.object_)


@pytest.fixture(scope="module")
def tokenizer(demo_model_dir):
    return open_tokenizer(demo_model_dir)


def test_a_mixed_batch_answers_each_request_in_order(tokenizer):
    requests = [
        {"text_input": column("Hello there", "a")},
        {"text_input": column("x"), "input_ids": np.ones((1, 2), np.int32)},
        {"messages": column(json.dumps(MESSAGES))},
        {"input_ids": np.array([[5, 6, PAD_ID]], np.int32), "num_tokens": np.array([[2]], np.int32)},
        {"text_input": column("world")},
    ]
    out = convert_batch(tokenizer, requests)
    hello, a = tokenizer.encode("Hello there"), tokenizer.encode("a")
    assert out[0]["num_tokens"].tolist() == [[len(hello)], [len(a)]]
    assert out[0]["input_ids"][0].tolist() == hello
    assert out[0]["input_ids"][1].tolist() == a + [PAD_ID] * (len(hello) - len(a))
    assert isinstance(out[1], InvalidRequest) and "exactly one" in str(out[1])
    assert out[2]["input_ids"][0].tolist() == tokenizer.encode_chat(parse_messages(MESSAGES))
    assert out[3]["text_output"][0, 0].decode() == tokenizer.decode([5, 6]) and out[3]["num_tokens"][0, 0] == 2
    assert out[4]["input_ids"][0].tolist() == tokenizer.encode("world")


def test_a_model_without_chat_template_refuses_messages_only(tokenizer):
    bare = type(tokenizer)(tokenizer.backend, tokenizer.eos_token_ids, tokenizer.bos_token_id, chat_template=None)
    out = convert_batch(bare, [{"messages": column(json.dumps(MESSAGES))}, {"text_input": column("Hi")}])
    assert isinstance(out[0], InvalidRequest) and out[0].field == "messages"
    assert out[1]["num_tokens"][0, 0] == len(tokenizer.encode("Hi"))

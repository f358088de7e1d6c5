"""lepton_ensemble (tokenizer -> lepton) streams what the lepton model streams."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
from tritonclient.utils import InferenceServerException

from tritonio import grpc_generate

pytestmark = pytest.mark.e2e

PROMPTS = ["The quick brown fox", "Return the number of items", "caf\u00e9 \u2603 \U0001f600", "a"]
MESSAGES = [{"role": "user", "content": "What is a list?"}]


def both(server, fields):
    direct = grpc_generate(server.grpc_url, fields)
    ensemble = grpc_generate(server.grpc_url, fields, model="lepton_ensemble")
    return direct, ensemble


@pytest.mark.parametrize("prompt", PROMPTS)
def test_the_ensemble_streams_the_same_pieces_as_the_direct_model(server, prompt):
    fields = {"text_input": prompt, "max_tokens": 24, "temperature": 0.0, "ignore_eos": True, "stream": True}
    direct, ensemble = both(server, fields)
    assert len(ensemble.texts) > 1  # NOTE: streamed: one response per piece, not one at the end
    assert ensemble.texts == direct.texts
    assert ensemble.finish_reason == direct.finish_reason == "length"
    assert ensemble.num_input_tokens == direct.num_input_tokens
    assert ensemble.num_output_tokens == direct.num_output_tokens == 24


def test_chat_messages_and_sampling_with_a_seed_match(server):
    fields = {"messages": json.dumps(MESSAGES), "max_tokens": 16, "temperature": 0.8, "seed": 7,
              "ignore_eos": True, "stream": True}
    direct, ensemble = both(server, fields)
    assert ensemble.texts == direct.texts and ensemble.num_input_tokens == direct.num_input_tokens


def test_concurrent_requests_through_the_ensemble_each_match(server):
    fields = [{"text_input": f"{p} {i}", "max_tokens": 12, "temperature": 0.0, "ignore_eos": True, "stream": True}
              for i, p in enumerate(PROMPTS * 3)]
    with ThreadPoolExecutor(len(fields)) as pool:
        ensemble = list(pool.map(lambda f: grpc_generate(server.grpc_url, f, model="lepton_ensemble"), fields))
    for f, reply in zip(fields, ensemble):
        assert reply.texts == grpc_generate(server.grpc_url, f).texts


@pytest.mark.parametrize("fields,words", [
    # NOTE: no prompt at all: Triton itself refuses the tokenizer step ("request has 0 inputs")
    ({"max_tokens": 4}, ["0 inputs"]),
    ({"text_input": "Hi", "max_tokens": 0}, ["max_tokens", ">= 1"]),
    ({"text_input": "word " * 2000, "max_tokens": 4}, ["input_ids", "context"]),
    ({"text_input": "Hi", "messages": json.dumps(MESSAGES)}, ["text_input", "messages", "exactly one"]),
])
def test_errors_name_the_field(server, fields, words):
    with pytest.raises(InferenceServerException) as info:
        grpc_generate(server.grpc_url, fields, model="lepton_ensemble")
    message = str(info.value)
    assert all(word in message for word in words), message

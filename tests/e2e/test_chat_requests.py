"""Chat requests (`messages`) through the real server: the template's prompt, clear errors."""

from __future__ import annotations

import json

import pytest
from tritonclient.utils import InferenceServerException

from lepton.chat import parse_messages
from lepton.config import EngineConfig
from lepton.engine import LLMEngine
from lepton.sampling_params import SamplingParams
from tritonio import grpc_generate, http_post

pytestmark = pytest.mark.e2e

MESSAGES = [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "What is a list?"}]


@pytest.fixture(scope="module")
def in_process(demo_model_dir):
    """The engine's greedy tokens and text for MESSAGES, in process."""
    engine = LLMEngine(EngineConfig.from_parameters({"model_dir": str(demo_model_dir)}))
    engine.add_request("c", parse_messages(MESSAGES), SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    text, tokens = "", []
    while engine.has_unfinished():
        for out in engine.step():
            text, tokens = text + out.text, tokens + out.token_ids
    return engine.prepare("p", parse_messages(MESSAGES), SamplingParams()).prompt_token_ids, tokens, text


@pytest.mark.parametrize("stream", [False, True])
def test_messages_over_grpc_equal_the_engine_in_process(server, in_process, stream):
    prompt_ids, tokens, text = in_process
    reply = grpc_generate(server.grpc_url, {"messages": json.dumps(MESSAGES), "max_tokens": 12,
                                            "temperature": 0.0, "ignore_eos": True, "stream": stream})
    assert reply.num_input_tokens == len(prompt_ids)
    assert reply.num_output_tokens == len(tokens) and reply.text == text  # NOTE: never echoes the prompt


def test_messages_over_http_generate(server, in_process):
    code, body = http_post(server.http_url, "/v2/models/lepton/generate",
                           {"messages": json.dumps(MESSAGES), "max_tokens": 12, "temperature": 0, "ignore_eos": True})
    assert code == 200, body
    assert json.loads(body)["text_output"] == in_process[2]


@pytest.mark.parametrize("fields,words", [
    ({"messages": json.dumps(MESSAGES), "text_input": "Hi"}, "messages: give one of text_input, messages, input_ids"),
    ({"messages": json.dumps([{"role": "robot", "content": "x"}])}, "messages[0].role: must be one of"),
    ({"messages": json.dumps([{"role": "user", "content": 7}])}, "messages[0].content: must be a string"),
    ({"messages": "not json"}, "messages: invalid JSON"),
    ({"messages": "[]"}, "messages: must be a non-empty JSON list"),
])
def test_bad_chat_requests_are_refused_with_their_field(server, fields, words):
    with pytest.raises(InferenceServerException) as info:
        grpc_generate(server.grpc_url, {**fields, "max_tokens": 2})
    assert words in str(info.value)

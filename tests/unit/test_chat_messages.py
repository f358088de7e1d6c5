"""Chat messages: validation naming the field, and templates rendered in the sandbox as transformers does."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lepton.chat import ChatMessage, ChatPrompt, ChatTemplate, parse_messages
from lepton.errors import InvalidRequest
from lepton.protocol import convert_request

CHATML = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] | trim + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def t_str(value: str) -> np.ndarray:
    return np.array([value.encode()], dtype=np.object_)


def test_parse_messages_and_content_parts():
    prompt = parse_messages([{"role": "system", "content": "Be brief."},
                             {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]},
                             {"role": "assistant", "content": "Hello", "name": "bot"}])
    assert prompt.messages == (ChatMessage("system", "Be brief."), ChatMessage("user", "Hi there"),
                               ChatMessage("assistant", "Hello", "bot"))


@pytest.mark.parametrize("data,field,words", [
    ([], "messages", "non-empty"),
    ({"role": "user"}, "messages", "non-empty"),
    (["hi"], "messages[0]", "object"),
    ([{"role": "robot", "content": "x"}], "messages[0].role", "one of system, user"),
    ([{"content": "x"}], "messages[0].role", "None"),
    ([{"role": "user", "content": 5}], "messages[0].content", "must be a string"),
    ([{"role": "user", "content": None}], "messages[0].content", "must be a string"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}], "messages[0].content[0]", "text"),
    ([{"role": "user", "content": "x", "tool_calls": []}], "messages[0]", "tool_calls"),
    ([{"role": "user", "content": "x", "name": 3}], "messages[0].name", "string"),
    # NOTE: found by tests/e2e/test_fuzz_requests.py: lone surrogates failed in the tokenizer as internal errors
    ([{"role": "user", "content": "a\ud800"}], "messages[0].content", "lone surrogate"),
    ([{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}], "messages[0].content", "lone surrogate"),
    ([{"role": "user", "content": "x", "name": "\ud800"}], "messages[0].name", "lone surrogate"),
    ([{"role": "user", "content": "x", "\ud800" + "k" * 500: 1}], "messages[0]", "unknown key"),
])
def test_bad_messages_name_the_field(data, field, words):
    with pytest.raises(InvalidRequest) as info:
        parse_messages(data)
    assert info.value.field == field and words in str(info.value)
    assert len(str(info.value)) < 300
    str(info.value).encode("utf-8")  # NOTE: raises on a lone surrogate echoed back


def test_protocol_takes_messages_instead_of_text_input():
    req = convert_request({"messages": t_str(json.dumps([{"role": "user", "content": "Hi"}]))}, 16)
    assert req.prompt == ChatPrompt((ChatMessage("user", "Hi"),))


@pytest.mark.parametrize("inputs,field", [
    ({"messages": t_str("[]"), "text_input": t_str("Hi")}, "messages"),
    ({"messages": t_str("[{")}, "messages"),
    ({"messages": t_str("[" * 100_000)}, "messages"),
    ({"messages": t_str(json.dumps([{"role": "user", "content": 1}]))}, "messages[0].content"),
    ({}, "text_input"),
])
def test_protocol_refuses_bad_chat_requests(inputs, field):
    with pytest.raises(InvalidRequest) as info:
        convert_request(inputs, 16)
    assert info.value.field == field


def test_template_renders_like_transformers():
    from transformers.utils.chat_template_utils import render_jinja_template

    messages = [{"role": "system", "content": "Be <b>brief</b>."}, {"role": "user", "content": "  Hi  "}]
    ours = ChatTemplate(CHATML, {"bos_token": "<s>", "eos_token": "</s>"}).render(parse_messages(messages))
    theirs, _ = render_jinja_template([messages], chat_template=CHATML, add_generation_prompt=True,
                                      bos_token="<s>", eos_token="</s>")
    assert ours == theirs[0]
    assert ours.startswith("<s><|im_start|>system\nBe <b>brief</b>.<|im_end|>") and ours.endswith("assistant\n")


def test_tojson_and_raise_exception_as_transformers():
    template = ChatTemplate("{{ messages | tojson }}{% if messages|length > 1 %}{{ raise_exception('one only') }}{% endif %}", {})
    assert template.render(parse_messages([{"role": "user", "content": "é<"}])) == '[{"role": "user", "content": "é<"}]'
    with pytest.raises(InvalidRequest) as info:
        template.render(parse_messages([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]))
    assert info.value.field == "messages" and "one only" in str(info.value)


@pytest.mark.parametrize("source", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ messages.append(1) }}",
    "{{ cycler.__init__.__globals__ }}",
])
def test_template_runs_sandboxed(source):
    with pytest.raises(InvalidRequest) as info:
        ChatTemplate(source, {}).render(parse_messages([{"role": "user", "content": "x"}]))
    assert info.value.field == "messages"

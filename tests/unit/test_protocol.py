"""Request parsing and validation: Triton tensors -> GenerateRequest, errors naming the field."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lepton.errors import InvalidRequest
from lepton.protocol import convert_request
from lepton.sampling_params import SamplingParams


def t_str(*values) -> np.ndarray:
    return np.array([v.encode() if isinstance(v, str) else v for v in values], dtype=np.object_)


def parse(default_max_tokens: int = 128, **inputs):
    return convert_request(inputs, default_max_tokens)


def test_text_only_uses_defaults():
    req = parse(text_input=t_str("Hello"))
    assert req.prompt == "Hello" and not req.stream and not req.exclude_input_in_output
    assert req.params == SamplingParams(max_tokens=128)


def test_vllm_style_sampling_parameters():
    params = {"max_tokens": 7, "temperature": 0, "top_p": 0.5, "top_k": 3, "stop": "END",
              "ignore_eos": True, "min_p": 0.1, "seed": 5, "repetition_penalty": 1.2}
    req = parse(text_input=t_str("Hi"), stream=np.array([True]),
                sampling_parameters=t_str(json.dumps(params)), exclude_input_in_output=np.array([True]))
    assert req.stream and req.exclude_input_in_output
    assert req.params == SamplingParams(max_tokens=7, temperature=0.0, top_p=0.5, top_k=3, stop=("END",),
                                        ignore_eos=True, min_p=0.1, seed=5, repetition_penalty=1.2)


def test_tensor_style_inputs():
    req = parse(text_input=t_str("Hi"), max_tokens=np.array([9], np.int32), temperature=np.array([0.5], np.float32),
                top_p=np.array([0.9], np.float32), top_k=np.array([4], np.int32), seed=np.array([11], np.uint64),
                stop=t_str("a", "bc"), min_tokens=np.array([2], np.int32), ignore_eos=np.array([True]))
    top_p = float(np.float32(0.9))  # NOTE: FP32 tensor value, widened exactly
    assert req.params == SamplingParams(max_tokens=9, temperature=0.5, top_p=top_p, top_k=4,
                                        seed=11, stop=("a", "bc"), min_tokens=2, ignore_eos=True)


def test_tensor_overrides_sampling_parameters():
    req = parse(text_input=t_str("Hi"), sampling_parameters=t_str(json.dumps({"max_tokens": 50, "top_k": 2})),
                max_tokens=np.array([3], np.int32))
    assert req.params.max_tokens == 3 and req.params.top_k == 2


@pytest.mark.parametrize("inputs,field,words", [
    ({}, "text_input", "missing"),
    ({"text_input": t_str("")}, "text_input", "empty"),
    ({"text_input": t_str(" \n\t")}, "text_input", "empty"),
    ({"text_input": t_str(b"\xff\xfe")}, "text_input", "UTF-8"),
    ({"text_input": t_str("a", "b")}, "text_input", "exactly one"),
    ({"text_input": t_str("x" * (1 << 20 + 1))}, "text_input", "at most"),
    ({"sampling_parameters": t_str("{bad")}, "sampling_parameters", "invalid JSON"),
    ({"sampling_parameters": t_str("[]")}, "sampling_parameters", "JSON object"),
    ({"sampling_parameters": t_str('{"max_tokens": 4, "beam_width": 2}')}, "sampling_parameters", "beam_width"),
    ({"sampling_parameters": t_str('{"max_tokens": "4x"}')}, "max_tokens", "integer"),
    ({"sampling_parameters": t_str('{"max_tokens": 4.5}')}, "max_tokens", "integer"),
    ({"sampling_parameters": t_str('{"stop": 5}')}, "stop", "list"),
    ({"max_tokens": np.array([0], np.int32)}, "max_tokens", ">= 1"),
    ({"max_tokens": np.array([-3], np.int32)}, "max_tokens", ">= 1"),
    ({"max_tokens": np.array([1, 2], np.int32)}, "max_tokens", "exactly one"),
    ({"temperature": np.array([-0.1], np.float32)}, "temperature", ">= 0.0"),
    ({"temperature": np.array([np.nan], np.float32)}, "temperature", "number"),
    ({"top_p": np.array([0.0], np.float32)}, "top_p", "> 0.0"),
    ({"top_p": np.array([1.01], np.float32)}, "top_p", "<= 1.0"),
    ({"top_k": np.array([-1], np.int32)}, "top_k", ">= 0"),
    ({"min_tokens": np.array([500], np.int32)}, "min_tokens", "max_tokens"),
    ({"stop": t_str("")}, "stop", "non-empty text"),
    ({"stop": t_str("x" * 257)}, "stop", "each stop string must be 1..256 characters of text, got one of 257"),
    ({"stream": np.array([1], np.int32)}, "stream", "BOOL"),
    ({"sampling_parameters": t_str('{"presence_penalty": 3}')}, "presence_penalty", "<= 2.0"),
    ({"sampling_parameters": t_str('{"logprobs": 21}')}, "logprobs", "<= 20"),
])
def test_bad_input_names_the_field(inputs, field, words):
    inputs = {"text_input": t_str("Hi"), **inputs} if "text_input" not in inputs and inputs else inputs
    with pytest.raises(InvalidRequest) as info:
        convert_request(inputs, 128)
    assert info.value.field == field
    assert words in str(info.value)


def test_numbers_as_strings_as_the_vllm_backend_takes_them():
    """genai-perf --backend vllm sends {"max_tokens": "64"}: numeric strings for numeric keys parse."""
    params = {"max_tokens": "64", "temperature": "0.5", "top_p": " 1 ", "top_k": "+3", "seed": "7",
              "min_p": "1e-2", "ignore_eos": "true", "skip_special_tokens": "False"}
    req = parse(text_input=t_str("Hi"), sampling_parameters=t_str(json.dumps(params)))
    assert req.params == SamplingParams(max_tokens=64, temperature=0.5, top_p=1.0, top_k=3, seed=7, min_p=0.01,
                                        ignore_eos=True, skip_special_tokens=False)


@pytest.mark.parametrize("key,value,words", [
    ("max_tokens", "6.4", "must be an integer, got '6.4'"),
    ("max_tokens", "sixty", "must be an integer"),
    ("temperature", "nan", "must be a number, got 'nan'"),
    ("temperature", "inf", "must be a number"),
    ("top_k", "", "must be an integer"),
    ("ignore_eos", "yes", "must be true or false"),
    ("ignore_eos", 1, "must be true or false"),
    ("repetition_penalty", 1e-300, "repetition_penalty: must be >= 0.01"),
    ("stop_token_ids", list(range(65)), "stop_token_ids: at most 64 ids, got 65"),
])
def test_bad_values_in_sampling_parameters_name_the_field(key, value, words):
    with pytest.raises(InvalidRequest) as info:
        parse(text_input=t_str("Hi"), sampling_parameters=t_str(json.dumps({key: value})))
    assert info.value.field == key and words in str(info.value)


@pytest.mark.parametrize("raw", ['{"max_tokens": ' + "9" * 5000 + "}", "[" * 100_000, '{"seed": ' + "1" * 4000 + "}"])
def test_huge_and_deep_json_is_a_clear_error(raw):
    with pytest.raises(InvalidRequest) as info:
        parse(text_input=t_str("Hi"), sampling_parameters=t_str(raw))
    assert len(str(info.value)) < 200 and info.value.field in ("sampling_parameters", "seed")


def test_tensorrt_llm_names_and_penalty_tensors():
    req = parse(text_input=t_str("Hi"), min_length=np.array([3], np.int32), random_seed=np.array([9], np.uint64),
                max_tokens=np.array([5], np.int32), repetition_penalty=np.array([1.5], np.float32),
                presence_penalty=np.array([0.5], np.float32), frequency_penalty=np.array([-0.5], np.float32))
    assert req.params == SamplingParams(max_tokens=5, min_tokens=3, seed=9, repetition_penalty=1.5,
                                        presence_penalty=0.5, frequency_penalty=-0.5)


@pytest.mark.parametrize("raw,field", [
    ('{"\\ud800": 1}', "sampling_parameters"),  # NOTE: echoed raw, this key made the error itself fail
    ('{"' + "k" * 60_000 + '": 1}', "sampling_parameters"),
    (json.dumps({f"key{i}": i for i in range(2000)}), "sampling_parameters"),
    ('{"stop": ["\\udfff"]}', "stop"),
])
def test_unknown_keys_and_surrogates_give_short_printable_errors(raw, field):
    """Found by tests/e2e/test_fuzz_requests.py: keys were echoed whole, lone surrogates reached the tokenizer."""
    with pytest.raises(InvalidRequest) as info:
        parse(text_input=t_str("Hi"), sampling_parameters=t_str(raw))
    message = str(info.value)
    assert info.value.field == field and len(message) < 400, message[:500]
    message.encode("utf-8")  # NOTE: raises on a lone surrogate


@pytest.mark.parametrize("parameters,field", [
    ({"max_token": 4}, "max_token"),
    ({"min_p": 0.5, "foo": True}, "foo"),
    ({"\ud800" * 3: 1}, "parameters"),
    ({"x" * 100: 1}, "parameters"),
])
def test_request_parameters_are_refused_not_dropped(parameters, field):
    """HTTP generate turns JSON keys that are not inputs into request parameters; none may be ignored."""
    with pytest.raises(InvalidRequest) as info:
        convert_request({"text_input": t_str("Hi")}, 16, parameters)
    message = str(info.value)
    assert info.value.field == field and "sampling_parameters" in message and len(message) < 300, message
    message.encode("utf-8")


def test_no_request_parameters_is_fine():
    assert convert_request({"text_input": t_str("Hi")}, 16, {}).params.max_tokens == 16

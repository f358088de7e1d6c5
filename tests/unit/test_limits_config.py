"""LimitsConfig: per-request limits the server's configuration sets, checked at the door (convert_request)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lepton.config import EngineConfig, LimitsConfig
from lepton.errors import ConfigError, InvalidRequest
from lepton.protocol import convert_request


def t_str(*values: str) -> np.ndarray:
    return np.array([v.encode() for v in values], dtype=np.object_)


def request(**sampling) -> dict[str, np.ndarray]:
    return {"text_input": t_str("Hello"), "sampling_parameters": t_str(json.dumps(sampling))}


def refused(limits: LimitsConfig, inputs: dict) -> str:
    with pytest.raises(InvalidRequest) as info:
        convert_request(inputs, 16, None, limits)
    return str(info.value)


def test_the_defaults():
    limits = EngineConfig(model_dir=Path("/m")).limits
    assert limits == LimitsConfig(max_request_bytes=1 << 20, max_prompt_tokens=0, max_output_tokens=0,
                                  max_stop_strings=16, max_stop_string_chars=256, max_logprobs=20)


def test_parameters_set_them_and_bad_values_fail_the_load():
    config = EngineConfig.from_parameters({"model_dir": "/m", "max_request_bytes": "64K", "max_stop_strings": "4",
                                           "max_output_tokens": "256", "max_prompt_tokens": "100"})
    assert (config.limits.max_request_bytes, config.limits.max_stop_strings) == (64 << 10, 4)
    assert (config.limits.max_output_tokens, config.limits.max_prompt_tokens) == (256, 100)
    for key, value, words in (("max_stop_strings", "0", "max_stop_strings: must be >= 1, got 0"),
                              ("max_stop_strings", "1025", "max_stop_strings: must be in [0, 1024], got 1025"),
                              ("max_logprobs", "101", "max_logprobs: must be in [0, 100], got 101"),
                              ("max_request_bytes", "0", "max_request_bytes: must be >= 1, got 0"),
                              ("max_output_tokens", "8", "default_max_tokens: must be <= max_output_tokens (8), got 128")):
        with pytest.raises(ConfigError) as info:
            EngineConfig.from_parameters({"model_dir": "/m", key: value})
        assert str(info.value) == words


def test_request_size():
    limits = LimitsConfig(max_request_bytes=100)
    assert refused(limits, {"text_input": t_str("x" * 120)}) == (
        "text_input: the request's inputs are 120 bytes, at most 100 (max_request_bytes); text_input is 120")
    inputs = {"text_input": t_str("x" * 60), "stop": t_str("y" * 30, "z" * 30)}
    assert refused(limits, inputs).startswith("text_input: the request's inputs are 120 bytes, at most 100")
    ids = {"input_ids": np.arange(30, dtype=np.int32)}
    assert refused(limits, ids) == "input_ids: the request's inputs are 120 bytes, at most 100 (max_request_bytes); input_ids is 120"
    assert convert_request({"text_input": t_str("x" * 100)}, 16, None, limits).prompt == "x" * 100


def test_stop_strings_count_and_length_lowered_and_raised():
    assert refused(LimitsConfig(max_stop_strings=2), request(stop=["a", "b", "c"])) == "stop: at most 2 stop strings, got 3"
    many = [f"s{i}" for i in range(40)]
    assert convert_request(request(stop=many), 16, None, LimitsConfig(max_stop_strings=40)).params.stop == tuple(many)
    assert refused(LimitsConfig(), request(stop=many)) == "stop: at most 16 stop strings, got 40"
    assert refused(LimitsConfig(max_stop_string_chars=4), request(stop=["abcde"])) == (
        "stop: each stop string must be 1..4 characters of text, got one of 5")
    assert convert_request(request(stop=["x" * 1000]), 16, None, LimitsConfig(max_stop_string_chars=1000)).params.stop


def test_max_tokens_and_logprobs():
    limits = LimitsConfig(max_output_tokens=8, max_logprobs=2)
    assert refused(limits, request(max_tokens=9)) == "max_tokens: must be <= 8 (max_output_tokens), got 9"
    assert convert_request(request(max_tokens=8), 8, None, limits).params.max_tokens == 8
    assert refused(limits, request(max_tokens=4, logprobs=3)) == "logprobs: must be <= 2, got 3"
    assert refused(LimitsConfig(), request(logprobs=21)) == "logprobs: must be <= 20, got 21"
    assert convert_request(request(logprobs=50), 16, None, LimitsConfig(max_logprobs=50)).params.logprobs == 50

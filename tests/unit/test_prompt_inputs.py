"""The prompt inputs of the lepton model: text_input, messages or input_ids, exactly one."""

from __future__ import annotations

import numpy as np
import pytest

from lepton.errors import InvalidRequest
from lepton.protocol import convert_request

TEXT = np.array([b"Hi"], dtype=np.object_)
MESSAGES = np.array([b'[{"role": "user", "content": "Hi"}]'], dtype=np.object_)


@pytest.mark.parametrize("array", [np.array([5, 0, 7], np.int32), np.array([[5, 0, 7]], np.int64)])
def test_input_ids_are_the_prompt(array):
    assert convert_request({"input_ids": array}, 16).prompt == [5, 0, 7]


@pytest.mark.parametrize("inputs,field,words", [
    ({"text_input": TEXT, "input_ids": np.array([1], np.int32)}, "input_ids", "not text_input and input_ids"),
    ({"messages": MESSAGES, "text_input": TEXT}, "messages", "not text_input and messages"),
    ({}, "text_input", "or give messages or input_ids"),
    ({"input_ids": np.array([1.5], np.float32)}, "input_ids", "INT32 or INT64"),
    ({"input_ids": np.array([[1, 2], [3, 4]], np.int32)}, "input_ids", "one sequence"),
    ({"input_ids": np.array([3, -1], np.int32)}, "input_ids", ">= 0, got -1"),
    ({"input_ids": np.zeros(0, np.int32)}, "input_ids", "empty"),
    ({"input_ids": np.zeros((1 << 20) + 1, np.int32)}, "input_ids", "at most"),
])
def test_bad_prompt_inputs_name_the_field(inputs, field, words):
    with pytest.raises(InvalidRequest) as info:
        convert_request(inputs, 16)
    assert info.value.field == field and words in str(info.value)

"""build_model_input: a step of decodes alone takes a shorter path that must lay out the same arrays."""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest

import lepton.batch as batch
from lepton.sampling_params import SamplingParams
from lepton.scheduler import ScheduledSeq, SchedulerOutput
from lepton.sequence import Sequence

BLOCK = 4


def _decodes(rng: random.Random, count: int, sample_all: bool = True) -> SchedulerOutput:
    items = []
    for i in range(count):
        prompt = [rng.randrange(100) for _ in range(rng.randrange(1, 12))]
        seq = Sequence(f"r{i}", prompt, SamplingParams(max_tokens=20), max_total_tokens=64)
        seq.output_token_ids.extend(rng.randrange(100) for _ in range(rng.randrange(0, 9)))
        computed = seq.num_tokens - 1
        blocks = rng.sample(range(50), -(-(computed + 1) // BLOCK))
        items.append(ScheduledSeq(seq, computed, 1, blocks, sample_all or rng.random() < 0.5))
    return SchedulerOutput(items, count)


def _fields(model_input: batch.ModelInput) -> dict:
    return {f.name: getattr(model_input, f.name) for f in dataclasses.fields(model_input)}


@pytest.mark.parametrize("count", [1, 2, 7, 16])
@pytest.mark.parametrize("sample_all", [True, False])
def test_decodes_alone_lay_out_what_the_general_path_does(count: int, sample_all: bool) -> None:
    rng = random.Random(count * 10 + sample_all)
    for _ in range(20):
        output = _decodes(rng, count, sample_all)
        fast = batch.build_model_input(output, BLOCK)
        general = batch._general_input(output.scheduled, BLOCK)
        for name, value in _fields(fast).items():
            expected = getattr(general, name)
            if name == "groups":
                assert len(value) == len(expected) == 1
                for got, want in zip(dataclasses.astuple(value[0]), dataclasses.astuple(expected[0])):
                    assert got.dtype == want.dtype and np.array_equal(got, want)
            elif isinstance(value, np.ndarray):
                assert value.dtype == expected.dtype == np.int64, name
                assert value.shape == expected.shape and np.array_equal(value, expected), name
            else:
                assert value == expected, name


def test_decodes_alone_read_prompt_and_output_tokens() -> None:
    seq = Sequence("a", [5, 6, 7], SamplingParams(max_tokens=4), max_total_tokens=16)
    seq.output_token_ids.extend([8, 9])
    on_prompt = batch.build_model_input(SchedulerOutput([ScheduledSeq(seq, 2, 1, [3], True)], 1), BLOCK)
    on_output = batch.build_model_input(SchedulerOutput([ScheduledSeq(seq, 4, 1, [3, 1], True)], 1), BLOCK)
    assert on_prompt.input_ids.tolist() == [7] and on_prompt.slot_mapping.tolist() == [3 * BLOCK + 2]
    assert on_output.input_ids.tolist() == [9] and on_output.slot_mapping.tolist() == [1 * BLOCK + 0]
    assert on_output.context_lens.tolist() == [5]


def test_decodes_alone_arrays_are_not_shared() -> None:
    output = _decodes(random.Random(1), 4)
    fast = batch.build_model_input(output, BLOCK)
    arrays = [a for a in _fields(fast).values() if isinstance(a, np.ndarray)]
    arrays += [a for g in fast.groups for a in dataclasses.astuple(g)]
    for i, a in enumerate(arrays):
        for b in arrays[i + 1:]:
            assert not np.shares_memory(a, b)

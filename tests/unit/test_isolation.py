"""Exact behaviour of lepton.isolation.sample_isolated, no model: the argmax-only pass against the sampler."""

from __future__ import annotations

import pytest
import torch

import lepton.isolation
from lepton.isolation import StepError, sample_isolated
from lepton.sampler import SamplingInput, make_generator, sample
from lepton.sampling_params import SamplingParams

NAN, INF = float("nan"), float("inf")


def row(output=(), eos=frozenset({0}), seed=0, **params) -> SamplingInput:
    p = SamplingParams(**params)
    return SamplingInput(p, [1, 2, 3], list(output), None if p.greedy else make_generator(seed), eos)


def greedy(n: int) -> list[SamplingInput]:
    return [row(temperature=0.0) for _ in range(n)]


def test_greedy_rows_take_the_samplers_tokens_without_calling_it(monkeypatch):
    logits = torch.randn(6, 500, generator=torch.Generator().manual_seed(3))
    expected = sample(logits, greedy(6)).token_ids
    monkeypatch.setattr(lepton.isolation, "sample", lambda *a: pytest.fail("the argmax-only rows were sampled"))
    errors = {}
    tokens, logprobs = sample_isolated(logits, [f"r{i}" for i in range(6)], greedy(6), errors)
    assert tokens == {f"r{i}": t for i, t in enumerate(expected)}
    assert logprobs == {f"r{i}": None for i in range(6)} and errors == {}


def test_ties_infinities_and_nan_rows():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0],      # first maximum
                           [-INF, -INF, -INF, -INF],  # all masked: the first
                           [0.0, INF, 2.0, INF],      # +inf is a maximum
                           [1.0, NAN, 9.0, NAN],      # a NaN anywhere fails the row
                           [NAN, NAN, NAN, NAN],
                           [2.0, 1.0, 0.0, 9.0]])
    rids = [f"r{i}" for i in range(6)]
    errors = {}
    tokens, _ = sample_isolated(logits, rids, greedy(6), errors)
    assert tokens == {"r0": 1, "r1": 0, "r2": 1, "r5": 3}
    assert sorted(errors) == ["r3", "r4"] and all(isinstance(e, StepError) and "NaN" in str(e) for e in errors.values())


@pytest.mark.parametrize("changes", [dict(temperature=1.0), dict(logprobs=2), dict(repetition_penalty=1.3),
                                     dict(min_tokens=3)])
def test_a_row_that_reads_more_than_the_argmax_is_sampled(monkeypatch, changes):
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(5))
    rows = greedy(2) + [row(temperature=0.0, **changes) if "temperature" not in changes else row(**changes)]
    calls = []
    real = lepton.isolation.sample
    monkeypatch.setattr(lepton.isolation, "sample", lambda lg, rs: calls.append(len(rs)) or real(lg, rs))
    errors = {}
    tokens, _ = sample_isolated(logits, ["a", "b", "c"], rows, errors)
    assert calls == [3] and errors == {}
    assert [tokens["a"], tokens["b"]] == logits[:2].argmax(-1).tolist()


def test_bfloat16_logits_go_through_the_sampler(monkeypatch):
    logits = torch.randn(2, 40, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    calls = []
    real = lepton.isolation.sample
    monkeypatch.setattr(lepton.isolation, "sample", lambda lg, rs: calls.append(len(rs)) or real(lg, rs))
    tokens, _ = sample_isolated(logits, ["a", "b"], greedy(2), {})
    assert calls == [2] and list(tokens.values()) == logits.float().argmax(-1).tolist()


def test_a_failing_argmax_pass_falls_back_to_the_sampler(monkeypatch):
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(2))

    def broken(*args):
        raise RuntimeError("injected")

    monkeypatch.setattr(lepton.isolation, "_argmax_rows", broken)
    errors = {}
    tokens, _ = sample_isolated(logits, ["a", "b", "c"], greedy(3), errors)
    assert list(tokens.values()) == logits.argmax(-1).tolist() and errors == {}

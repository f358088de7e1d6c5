"""Exact behaviour of lepton.sampler, no model."""

from __future__ import annotations

import math

import pytest
import torch

from lepton.sampler import (
    SamplingInput,
    apply_min_tokens,
    apply_penalties,
    make_generator,
    process_logits,
    sample,
)
from lepton.sampling_params import SamplingParams

VOCAB = 32


def row(prompt=(1, 2, 3), output=(), seed=0, eos=frozenset({0}), **params) -> SamplingInput:
    """A batch row; non-greedy rows get a generator seeded with seed."""
    p = SamplingParams(**params)
    gen = None if p.greedy else make_generator(seed)
    return SamplingInput(p, list(prompt), list(output), gen, eos)


def random_logits(rows: int, vocab: int = VOCAB, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def logits_of(probs: list[float]) -> torch.Tensor:
    return torch.tensor([probs]).log()


def draws(logits: torch.Tensor, n: int, seed: int = 0, **params) -> list[int]:
    """n successive samples of one row (one generator advanced n times)."""
    r = row(seed=seed, **params)
    return [sample(logits, [r]).token_ids[0] for _ in range(n)]


# --- greedy ------------------------------------------------------------------------------------


def test_greedy_is_argmax():
    logits = random_logits(5)
    out = sample(logits, [row(temperature=0.0) for _ in range(5)])
    assert out.token_ids == logits.argmax(-1).tolist()
    assert out.logprobs == [None] * 5


def test_greedy_rows_in_mixed_batch_are_argmax():
    logits = random_logits(4)
    rows = [row(temperature=0.0), row(temperature=1.0), row(temperature=0.0), row(temperature=0.7, top_k=5)]
    out = sample(logits, rows)
    assert out.token_ids[0] == logits[0].argmax().item()
    assert out.token_ids[2] == logits[2].argmax().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_takes_the_first_maximum_on_ties(dtype):
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0], [5.0, 2.0, 5.0, 5.0], [-1.0, -1.0, -1.0, -1.0]], dtype=dtype)
    assert sample(logits, [row(temperature=0.0)] * 3).token_ids == [1, 0, 0]


def test_greedy_bf16_logits_are_upcast():
    logits = random_logits(3).to(torch.bfloat16)
    assert sample(logits, [row(temperature=0.0)] * 3).token_ids == logits.float().argmax(-1).tolist()


def test_empty_batch_and_shape_mismatch():
    assert sample(torch.zeros(0, VOCAB), []).token_ids == []
    with pytest.raises(ValueError):
        sample(torch.zeros(2, VOCAB), [row()])


def test_sample_does_not_modify_logits():
    logits = random_logits(2)
    before = logits.clone()
    sample(logits, [row(output=(1, 1), min_tokens=5, max_tokens=8, repetition_penalty=1.5)] * 2)
    assert torch.equal(logits, before)


# --- top-k / top-p / min-p ---------------------------------------------------------------------


def test_top_k_1_equals_greedy():
    logits = random_logits(8, seed=3)
    greedy = logits.argmax(-1).tolist()
    for seed in range(20):
        rows = [row(seed=seed, temperature=1.5, top_k=1) for _ in range(8)]
        assert sample(logits, rows).token_ids == greedy


def test_top_k_2_only_yields_top_two():
    logits = torch.tensor([[1.0, 3.0, 2.9, 2.8, 0.5, 2.7]])
    seen = {sample(logits, [row(seed=s, temperature=2.0, top_k=2)]).token_ids[0] for s in range(300)}
    assert seen == {1, 2}


def test_top_k_at_least_vocab_does_not_cut():
    logits = torch.zeros(1, 4)
    seen = {sample(logits, [row(seed=s, top_k=100)]).token_ids[0] for s in range(200)}
    assert seen == {0, 1, 2, 3}


def test_top_p_keeps_the_crossing_token():
    logits = logits_of([0.5, 0.3, 0.15, 0.05])
    assert set(draws(logits, 500, top_p=0.7)) == {0, 1}
    assert set(draws(logits, 500, top_p=0.6)) == {0, 1}
    assert set(draws(logits, 200, top_p=0.5)) == {0}
    assert set(draws(logits, 200, top_p=0.1)) == {0}
    assert set(draws(logits, 2000, top_p=1.0)) == {0, 1, 2, 3}


def test_top_p_distribution_is_renormalized():
    logits = logits_of([0.5, 0.3, 0.15, 0.05])
    picks = draws(logits, 4000, seed=7, top_p=0.7)
    assert abs(picks.count(0) / 4000 - 0.5 / 0.8) < 0.03


def test_top_p_applies_after_top_k():
    # NOTE: after top_k=2 the kept mass is [0.625, 0.375]; top_p=0.6 then keeps only the first.
    logits = logits_of([0.5, 0.3, 0.15, 0.05])
    assert set(draws(logits, 300, top_k=2, top_p=0.6)) == {0}
    assert set(draws(logits, 300, top_k=3, top_p=0.8)) == {0, 1}


def test_min_p_drops_tokens_below_fraction_of_max():
    logits = logits_of([0.4, 0.3, 0.19, 0.11])
    assert set(draws(logits, 1000, min_p=0.5)) == {0, 1}  # threshold 0.2
    assert set(draws(logits, 1000, min_p=0.25)) == {0, 1, 2, 3}  # threshold 0.1
    assert set(draws(logits, 200, min_p=1.0)) == {0}


def test_filters_with_unsorted_vocab():
    logits = torch.tensor([[0.0, 5.0, -1.0, 4.0, 4.5, -3.0]])
    assert set(draws(logits, 400, top_k=3)) == {1, 3, 4}
    assert set(draws(logits, 400, top_k=3, min_p=0.5)) <= {1, 3, 4}


def test_at_least_one_token_survives_extreme_filters():
    logits = random_logits(3, seed=5)
    rows = [row(seed=s, top_p=1e-9, min_p=1.0, top_k=1, temperature=100.0) for s in range(3)]
    assert sample(logits, rows).token_ids == logits.argmax(-1).tolist()


# --- temperature -------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_empirical_distribution_matches_softmax(temperature):
    logits = torch.tensor([[1.0, 0.5, 0.0, -0.5, -1.0, 2.0]])
    n = 4000
    picks = draws(logits, n, seed=11, temperature=temperature)
    expected = torch.softmax(logits[0] / temperature, -1)
    empirical = torch.bincount(torch.tensor(picks), minlength=6).float() / n
    assert (empirical - expected).abs().max().item() < 0.03


def test_tiny_temperature_is_nearly_greedy():
    logits = random_logits(4, seed=9)
    rows = [row(seed=s, temperature=1e-8) for s in range(4)]
    assert sample(logits, rows).token_ids == logits.argmax(-1).tolist()


def test_masked_tokens_are_never_sampled():
    logits = torch.zeros(1, 5)
    logits[0, 2] = float("-inf")
    assert 2 not in draws(logits, 500, temperature=3.0)


# --- penalties ---------------------------------------------------------------------------------


def test_no_penalties_returns_same_tensor():
    logits = random_logits(2)
    assert apply_penalties(logits, [row(), row()]) is logits


def test_repetition_penalty_formula():
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0, 3.0, 0.5]])
    r = row(prompt=(0, 1), output=(2, 3, 3), repetition_penalty=2.0)
    out = apply_penalties(logits, [r])
    assert torch.allclose(out, torch.tensor([[1.0, -4.0, 0.5, -2.0, 3.0, 0.5]]))


def test_frequency_and_presence_penalty_formula():
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0, 3.0, 0.5]])
    r = row(prompt=(0, 4), output=(2, 3, 3, 3, 5), frequency_penalty=0.5, presence_penalty=0.25)
    out = apply_penalties(logits, [r])
    # NOTE: prompt tokens 0 and 4 are not penalized by frequency or presence.
    expected = torch.tensor([[2.0, -2.0, 1.0 - 0.5 - 0.25, -1.0 - 1.5 - 0.25, 3.0, 0.5 - 0.5 - 0.25]])
    assert torch.allclose(out, expected)


def test_all_penalties_together_and_per_row():
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0], [2.0, -2.0, 1.0, -1.0], [2.0, -2.0, 1.0, -1.0]])
    rows = [
        row(prompt=(0,), output=(1, 1), repetition_penalty=1.5, frequency_penalty=1.0, presence_penalty=-0.5),
        row(prompt=(0,), output=(1, 1)),  # no penalties: unchanged
        row(prompt=(3, 99), output=(2, -1, 77), presence_penalty=1.0),  # out-of-range ids ignored
    ]
    out = apply_penalties(logits, rows)
    first = [2.0 / 1.5, -2.0 * 1.5 - 2.0 + 0.5, 1.0, -1.0]
    assert torch.allclose(out[0], torch.tensor(first))
    assert torch.equal(out[1], logits[1])
    assert torch.allclose(out[2], torch.tensor([2.0, -2.0, 0.0, -1.0]))


def test_penalties_change_sampling():
    logits = torch.tensor([[5.0, 0.0, 0.0]])
    out = sample(logits, [row(output=(0,) * 10, temperature=0.0, frequency_penalty=2.0)])
    assert out.token_ids[0] != 0


# --- min_tokens --------------------------------------------------------------------------------


def test_min_tokens_masks_eos_and_stop_ids_until_reached():
    logits = torch.zeros(1, 8)
    params = dict(min_tokens=3, max_tokens=10, stop_token_ids=(5, 6), eos=frozenset({0, 7}))
    before = apply_min_tokens(logits, [row(output=(1, 2), **params)])
    assert before[0].tolist() == [-math.inf, 0, 0, 0, 0, -math.inf, -math.inf, -math.inf]
    after = apply_min_tokens(logits, [row(output=(1, 2, 3), **params)])
    assert after is logits


def test_min_tokens_in_sampling():
    logits = torch.tensor([[10.0, 0.0, 0.0, 9.0]])  # eos 0 is the argmax
    params = dict(temperature=0.0, min_tokens=2, max_tokens=5, stop_token_ids=(3,))
    assert sample(logits, [row(output=(1,), **params)]).token_ids == [1]
    assert sample(logits, [row(output=(1, 2), **params)]).token_ids == [0]


def test_ignore_eos_does_not_mask():
    logits = torch.tensor([[10.0, 0.0]])
    assert sample(logits, [row(temperature=0.0, ignore_eos=True)]).token_ids == [0]


# --- reproducibility ---------------------------------------------------------------------------


def _run_steps(make_rows, target: int, steps: int) -> list[int]:
    """Run steps where make_rows(step) builds the batch, growing outputs; return the target row's tokens."""
    tokens = []
    for step in range(steps):
        rows, logits = make_rows(step)
        out = sample(logits, rows).token_ids
        for r, t in zip(rows, out):
            r.output_token_ids.append(t)
        tokens.append(out[target])
    return tokens


def test_seeded_row_is_reproducible_across_batch_compositions():
    steps = 12
    step_logits = [random_logits(1, vocab=64, seed=100 + s)[0] for s in range(steps)]
    configs = [
        dict(temperature=0.9),
        dict(temperature=0.8, top_k=10, top_p=0.9),
        dict(temperature=1.2, min_p=0.05, repetition_penalty=1.3),
    ]
    for cfg in configs:
        results = []
        for others, position in [(0, 0), (3, 0), (3, 2), (5, 5), (2, 1)]:
            target = row(seed=1234, **cfg)
            filler = [
                row(seed=9 + j, **[dict(temperature=0.0), dict(top_k=3), dict(top_p=0.5), dict()][j % 4])
                for j in range(others)
            ]
            batch = filler[:position] + [target] + filler[position:]

            def make_rows(step, batch=batch, position=position):
                noise = random_logits(len(batch), vocab=64, seed=others * 1000 + step)
                noise[position] = step_logits[step]
                return batch, noise

            results.append(_run_steps(make_rows, position, steps))
        assert all(r == results[0] for r in results), (cfg, results)


def test_different_seeds_differ_and_same_seed_repeats():
    logits = torch.zeros(1, 1000)
    a = draws(logits, 20, seed=1)
    assert a == draws(logits, 20, seed=1)
    assert a != draws(logits, 20, seed=2)


def test_make_generator_without_seed_is_random():
    a = torch.rand(4, generator=make_generator(None))
    b = torch.rand(4, generator=make_generator(None))
    assert not torch.equal(a, b)
    assert torch.equal(torch.rand(4, generator=make_generator(5)), torch.rand(4, generator=make_generator(5)))


# --- logprobs ----------------------------------------------------------------------------------


def test_logprobs_match_log_softmax_of_raw_logits():
    logits = random_logits(3, seed=21)
    rows = [row(seed=1, temperature=0.7, top_k=4, logprobs=5), row(temperature=0.0), row(seed=2, logprobs=0)]
    out = sample(logits, rows)
    ref = torch.log_softmax(logits, -1)
    values, ids = ref[0].topk(5)
    entries = out.logprobs[0]
    assert entries[0][0] == out.token_ids[0]
    assert entries[0][1] == pytest.approx(ref[0, out.token_ids[0]].item(), abs=1e-5)
    assert [t for t, _ in entries[1:]] == ids.tolist()
    assert [v for _, v in entries[1:]] == pytest.approx(values.tolist(), abs=1e-5)
    assert out.logprobs[1] is None
    assert out.logprobs[2] == [(out.token_ids[2], pytest.approx(ref[2, out.token_ids[2]].item(), abs=1e-5))]


def test_logprobs_include_penalties_and_cap_at_vocab():
    logits = torch.tensor([[1.0, 2.0, 3.5]])
    r = row(output=(2,), temperature=0.0, logprobs=20, presence_penalty=2.0)
    out = sample(logits, [r])
    ref = torch.log_softmax(torch.tensor([1.0, 2.0, 1.5]), -1)
    assert out.token_ids == [1]
    assert out.logprobs[0][0] == (1, pytest.approx(ref[1].item(), abs=1e-6))
    assert [t for t, _ in out.logprobs[0][1:]] == [1, 2, 0]


def test_process_logits_upcasts_without_changes():
    logits = random_logits(2).to(torch.bfloat16)
    out = process_logits(logits, [row(), row()])
    assert out.dtype == torch.float32 and torch.equal(out, logits.float())

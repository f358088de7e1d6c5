"""A failure in one request's model run, sampling or detokenization fails that request alone.

Failures are injected from the test, through the engine's own objects (its runner, the sampler it
calls, the detokenizer class), never by editing the code. Every test checks the other requests
return the tokens they return alone and that the KV pool ends empty with nothing left pending.
"""

from __future__ import annotations

import pytest
import torch

import lepton.isolation
from lepton.config import EngineConfig
from lepton.detokenizer import IncrementalDetokenizer
from lepton.engine import LLMEngine
from lepton.sampling_params import SamplingParams
from lepton.sequence import FinishReason

MARK_STOP = "\u2603never\u2603"  # NOTE: a stop string no output contains; marks the faulty request


class Injected(RuntimeError):
    pass


def make_engine(model_dir, **params) -> LLMEngine:
    return LLMEngine(EngineConfig.from_parameters({"model_dir": str(model_dir), **params}))


def params(faulty: bool = False, **changes) -> SamplingParams:
    base = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, stop=(MARK_STOP,) if faulty else ())
    return base.replace(**changes)


def prompt_ids(engine: LLMEngine, i: int) -> list[int]:
    text = "Return a new list containing all items from the iterable in ascending order. " * 3
    ids = engine.tokenizer.encode(text)
    return ids[: 20 + 7 * i]


def run_all(engine: LLMEngine, requests: dict) -> dict:
    """Add (prompt, params) requests at once; step to the end; {id: (tokens, finish reason, error)}."""
    for rid, (prompt, p) in requests.items():
        engine.add_request(rid, prompt, p)
    tokens = {rid: [] for rid in requests}
    finals = {}
    for _ in range(500):
        if not engine.has_unfinished():
            break
        for out in engine.step():
            tokens[out.request_id] += out.token_ids
            if out.finished:
                finals[out.request_id] = (out.finish_reason, out.error)
    assert not engine.has_unfinished()
    return {rid: (tokens[rid], *finals[rid]) for rid in requests}


def assert_clean(engine: LLMEngine) -> None:
    assert engine.kv_cache.num_used_blocks == 0
    assert not engine.kv_cache._pending
    assert engine.num_requests == 0 and not engine.scheduler.running and not engine.scheduler.waiting


@pytest.fixture(scope="module")
def alone(demo_model_dir):
    engine = make_engine(demo_model_dir, enable_prefix_caching="false")
    return {f"r{i}": run_all(engine, {f"r{i}": (prompt_ids(engine, i), params())})[f"r{i}"][0] for i in range(4)}


def four_requests(engine: LLMEngine, faulty: str) -> dict:
    return {f"r{i}": (prompt_ids(engine, i), params(faulty=f"r{i}" == faulty)) for i in range(4)}


class FaultyRunner:
    """The engine's runner, raising whenever a step computes the faulty request's first prompt token."""

    def __init__(self, runner, marker_token: int) -> None:
        self.runner, self.marker_token, self.calls = runner, marker_token, 0

    def __getattr__(self, name):
        return getattr(self.runner, name)

    def execute(self, batch):
        self.calls += 1
        if self.marker_token in batch.input_ids.tolist():
            raise Injected("runner failed")
        return self.runner.execute(batch)


def test_runner_failure_fails_only_its_request(demo_model_dir, alone):
    engine = make_engine(demo_model_dir)
    requests = four_requests(engine, faulty="r2")
    # NOTE: a token in no other prompt and no other output, appended to r2's prompt, marks r2's steps.
    seen = {t for rid, (p, _) in requests.items() if rid != "r2" for t in p} | {t for v in alone.values() for t in v}
    marker = next(t for t in range(100, 1000) if t not in seen)
    requests["r2"] = (requests["r2"][0] + [marker], requests["r2"][1])
    engine.runner = FaultyRunner(engine.runner, marker)
    results = run_all(engine, requests)
    tokens, reason, error = results["r2"]
    assert reason is FinishReason.ERROR and isinstance(error, Injected) and tokens == []
    for rid in ("r0", "r1", "r3"):
        assert results[rid] == (alone[rid], FinishReason.LENGTH, None)
    assert_clean(engine)


def test_a_failed_prefill_leaves_no_cache_entry_behind(demo_model_dir, alone):
    """The failed request's blocks held no K/V: a retry of the same prompt must not hit them."""
    engine = make_engine(demo_model_dir)
    prompt = prompt_ids(engine, 3)
    real = engine.runner
    engine.runner = FaultyRunner(real, prompt[0])
    assert run_all(engine, {"bad": (prompt, params())})["bad"][1] is FinishReason.ERROR
    engine.runner = real
    retry = run_all(engine, {"retry": (prompt, params())})["retry"]
    assert retry == (alone["r3"], FinishReason.LENGTH, None)
    assert engine.kv_cache.prefix_cache_hits == 0
    assert_clean(engine)


def test_sampling_failure_fails_only_its_request(demo_model_dir, alone, monkeypatch):
    real_sample = lepton.isolation.sample

    def sample(logits, rows):
        if any(MARK_STOP in row.params.stop for row in rows):
            raise Injected("sampler failed")
        return real_sample(logits, rows)

    monkeypatch.setattr(lepton.isolation, "sample", sample)
    engine = make_engine(demo_model_dir)
    requests = four_requests(engine, faulty="r1")
    # NOTE: the faulty request draws (greedy rows alone take their argmax without the sampler)
    requests["r1"] = (requests["r1"][0], params(faulty=True, temperature=1.0, seed=3))
    results = run_all(engine, requests)
    assert results["r1"][1:] == (FinishReason.ERROR, results["r1"][2]) and isinstance(results["r1"][2], Injected)
    for rid in ("r0", "r2", "r3"):
        assert results[rid] == (alone[rid], FinishReason.LENGTH, None)
    assert_clean(engine)


def test_seeded_rows_draw_the_same_after_a_neighbour_fails(demo_model_dir, monkeypatch):
    seeded = params(temperature=1.0, top_p=0.9, seed=7)
    engine = make_engine(demo_model_dir)
    expected = run_all(engine, {"s": (prompt_ids(engine, 0), seeded)})["s"][0]
    real_sample = lepton.isolation.sample

    def sample(logits, rows):
        if any(MARK_STOP in row.params.stop for row in rows):
            real_sample(logits, rows)  # NOTE: draws from every row's generator, then fails
            raise Injected("sampler failed")
        return real_sample(logits, rows)

    monkeypatch.setattr(lepton.isolation, "sample", sample)
    results = run_all(engine, {"s": (prompt_ids(engine, 0), seeded),
                               "bad": (prompt_ids(engine, 1), params(faulty=True, temperature=1.0))})
    assert results["s"] == (expected, FinishReason.LENGTH, None)
    assert results["bad"][1] is FinishReason.ERROR
    assert_clean(engine)


def test_detokenization_failure_fails_only_its_request(demo_model_dir, alone, monkeypatch):
    real_add = IncrementalDetokenizer.add_tokens

    def add_tokens(self, token_ids):
        if MARK_STOP in self._stops:
            raise Injected("detokenizer failed")
        return real_add(self, token_ids)

    monkeypatch.setattr(IncrementalDetokenizer, "add_tokens", add_tokens)
    engine = make_engine(demo_model_dir)
    results = run_all(engine, four_requests(engine, faulty="r0"))
    assert results["r0"][1] is FinishReason.ERROR and isinstance(results["r0"][2], Injected)
    for rid in ("r1", "r2", "r3"):
        assert results[rid] == (alone[rid], FinishReason.LENGTH, None)
    assert_clean(engine)


def test_nan_logits_fail_only_their_row(demo_model_dir, alone):
    engine = make_engine(demo_model_dir)
    requests = four_requests(engine, faulty="r3")
    real = engine.runner

    class NanRunner(FaultyRunner):
        def execute(self, batch):
            logits = real.execute(batch)
            rows = torch.tensor([rid == "r3" for rid in batch.sample_request_ids]).unsqueeze(1)
            return logits.masked_fill(rows & (torch.arange(logits.shape[1]) == 5), float("nan"))

    engine.runner = NanRunner(real, -1)
    results = run_all(engine, requests)
    assert results["r3"][1] is FinishReason.ERROR and "NaN" in str(results["r3"][2])
    for rid in ("r0", "r1", "r2"):
        assert results[rid] == (alone[rid], FinishReason.LENGTH, None)
    assert_clean(engine)


def test_min_tokens_holds_back_stop_strings(demo_model_dir):
    engine = make_engine(demo_model_dir)
    prompt = prompt_ids(engine, 0)
    free = run_all(engine, {"free": (prompt, params(max_tokens=8))})["free"][0]
    first_text = engine.tokenizer.decode(free[:1]).strip() or engine.tokenizer.decode(free[:2]).strip()
    stop = first_text[:2]
    stopped = run_all(engine, {"a": (prompt, params(max_tokens=8, ignore_eos=False, stop=(stop,)))})["a"]
    held = run_all(engine, {"b": (prompt, params(max_tokens=8, ignore_eos=False, stop=(stop,), min_tokens=5))})["b"]
    assert len(stopped[0]) < 5 and stopped[1] is FinishReason.STOP
    assert len(held[0]) >= 5 and held[0][:5] == free[:5]

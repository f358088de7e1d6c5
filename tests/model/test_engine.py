"""The engine in-process on the demo model: batching, preemption and prefix caching change no token."""

from __future__ import annotations

import pytest

from lepton.config import EngineConfig
from lepton.engine import LLMEngine
from lepton.errors import InvalidRequest
from lepton.sampling_params import SamplingParams


def make_engine(model_dir, **params) -> LLMEngine:
    return LLMEngine(EngineConfig.from_parameters({"model_dir": str(model_dir), **params}))


def run(engine: LLMEngine, requests: dict[str, tuple[list[int], int]]) -> dict[str, list[int]]:
    """Add all requests (prompt ids, max_tokens) at once, step to the end, return generated ids."""
    for rid, (prompt, max_tokens) in requests.items():
        engine.add_request(rid, prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
    out: dict[str, list[int]] = {rid: [] for rid in requests}
    while engine.has_unfinished():
        for o in engine.step():
            out[o.request_id] += o.token_ids
    return out


def prompts(engine: LLMEngine, n: int) -> dict[str, tuple[list[int], int]]:
    """n prompts of different lengths (10..160 tokens) and output lengths, from real text."""
    text = ("Return a new list containing all items from the iterable in ascending order. "
            "A custom key function can be supplied to customize the sort order. ") * 6
    ids = engine.tokenizer.encode(text)
    return {f"r{i}": (ids[: 10 + (i * 37) % 150], 8 + (i * 5) % 24) for i in range(n)}


@pytest.fixture(scope="module")
def alone(demo_model_dir):
    engine = make_engine(demo_model_dir)
    reqs = prompts(engine, 16)
    return reqs, {rid: run(engine, {rid: req})[rid] for rid, req in reqs.items()}


def test_sixteen_concurrent_requests_equal_each_alone(demo_model_dir, alone):
    reqs, expected = alone
    # NOTE: a small token budget forces chunked prefill mixed with decodes across many steps.
    engine = make_engine(demo_model_dir, max_num_batched_tokens="64")
    assert run(engine, reqs) == expected
    assert engine.kv_cache.num_used_blocks == 0


def test_preempted_and_resumed_requests_return_the_same_tokens(demo_model_dir, alone):
    reqs, expected = alone
    # 12 blocks of 16 tokens: far fewer than 16 requests need at once, so the scheduler preempts.
    engine = make_engine(demo_model_dir, kv_cache_memory_bytes=str(12 * 32768), max_model_len="192")
    assert engine.kv_cache.num_blocks == 12
    assert run(engine, reqs) == expected
    assert engine.stats().num_preemptions > 0
    assert engine.kv_cache.num_used_blocks == 0


def test_shared_prefix_is_computed_once(demo_model_dir):
    engine = make_engine(demo_model_dir)
    prefix = engine.tokenizer.encode("You are a helpful assistant. " * 12)[:64]  # 4 full blocks
    reqs = {f"s{i}": (prefix + [100 + i, 200, 300 + i, 400, 500], 6) for i in range(8)}
    got = run(engine, reqs)
    stats = engine.stats()
    # the prefix once, each suffix, and one decode step per generated token but the last
    assert stats.computed_tokens == 64 + 8 * 5 + 8 * (6 - 1)
    assert stats.prefix_cache_hits >= 7 * 64
    assert got == run(make_engine(demo_model_dir, enable_prefix_caching="false"), reqs)


def test_a_model_too_large_for_memory_is_refused_at_load(demo_model_dir):
    from lepton.errors import ModelFolderError
    from lepton.memory import available_bytes

    too_much = available_bytes() + (1 << 30)
    with pytest.raises(ModelFolderError, match=r"weights \(0\.\d\d GiB\) \+ KV cache .* memory available"):
        make_engine(demo_model_dir, kv_cache_memory_bytes=str(too_much))


def test_kv_budget_as_a_fraction_of_available_memory(demo_model_dir):
    engine = make_engine(demo_model_dir, kv_cache_memory_fraction="0.01")
    per_block = 2 * 4 * 16 * 2 * 32 * 4  # K and V, 4 layers, block 16, 2 KV heads of 32, fp32
    assert engine.kv_cache.num_blocks > (64 << 20) // per_block  # 1% of >= 6.4 GiB free


def test_the_configured_limits_hold_in_process(demo_model_dir):
    engine = make_engine(demo_model_dir, max_prompt_tokens="8", max_stop_strings="1")
    assert engine.prepare("fits", list(range(3, 11)), SamplingParams(max_tokens=4)).prompt_token_ids == list(range(3, 11))
    with pytest.raises(InvalidRequest) as info:
        engine.prepare("long", list(range(3, 12)), SamplingParams(max_tokens=4))
    assert str(info.value) == "input_ids: 9 tokens, at most 8 (max_prompt_tokens)"
    with pytest.raises(InvalidRequest) as info:
        engine.prepare("stops", [3, 4], SamplingParams(max_tokens=4, stop=("a", "b")))
    assert str(info.value) == "stop: at most 1 stop strings, got 2"

"""A seeded request gives the same tokens and logprobs whatever else is batched (issue 11, item 6).

The engine in-process, with the torch runner on the demo model and the onnxruntime runner on its
fp32 export: one seeded request (temperature 1, top_p 0.9, as reported) alone in a fresh engine,
then again among other requests that arrive at once or step after step, with its prompt split
into chunks, behind a prefix-cache hit and through a preemption. Logprobs are compared exactly:
a logit that moves by one ulp changes them, while the sampled text flips only now and then.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from lepton.config import EngineConfig
from lepton.engine import LLMEngine
from lepton.errors import ConfigError
from lepton.sampling_params import SamplingParams

TARGET = "target"
PROMPT = ("The quick brown fox jumps over the lazy dog, and then it runs back into the forest to "
          "find the others, who are waiting by the river for the evening to come.")
NUM_TOKENS = 48
OTHER_PROMPTS = [f"Request {i} is about something else entirely: " + "the cat sat on the mat. " * (1 + i)
                 for i in range(8)]


def target_params(seed: int) -> SamplingParams:
    return SamplingParams(max_tokens=NUM_TOKENS, temperature=1.0, top_p=0.9, seed=seed, ignore_eos=True, logprobs=2)


def other_params(i: int) -> SamplingParams:
    """Mates of every kind: greedy, seeded, unseeded, top-k, penalties."""
    kinds = [dict(temperature=0.0), dict(seed=100 + i), dict(), dict(top_k=20, seed=i),
             dict(repetition_penalty=1.3, temperature=0.8), dict(top_p=0.5, min_p=0.05)]
    return SamplingParams(max_tokens=8 + 7 * i, ignore_eos=True, **kinds[i % len(kinds)])


def make_engine(model_dir: Path, runner: str, **params) -> LLMEngine:
    block = {"block_size": "8"} if runner == "onnxruntime" else {}
    config = {"model_dir": str(model_dir), "runner": runner, "deterministic": "true", **block, **params}
    return LLMEngine(EngineConfig.from_parameters(config))


def run(engine: LLMEngine, seed: int, others: int = 0, arrive_at: tuple[int, ...] = (0,),
        before: str | None = None, target_last: bool = False) -> list[tuple[int, list]]:
    """The target's (token, logprobs) per step. `others` mates arrive spread over the steps in
    arrive_at, after the target (or before it: target_last); `before` is a prompt run to its end
    first, which leaves its blocks in the prefix cache."""
    if before is not None:
        engine.add_request("before", before, SamplingParams(max_tokens=4, temperature=0.0))
        while engine.has_unfinished():
            engine.step()
    pending = [(f"other-{i}", OTHER_PROMPTS[i], other_params(i)) for i in range(others)]
    target = (TARGET, PROMPT, target_params(seed))
    if target_last:
        pending.append(target)
    else:
        engine.add_request(*target)
    got, step = [], 0
    while engine.has_unfinished() or pending:
        if step in arrive_at:
            share = -(-len(pending) // len([s for s in arrive_at if s >= step]))
            for request in pending[:share]:
                engine.add_request(*request)
            del pending[:share]
        for output in engine.step():
            if output.request_id == TARGET:
                got += list(zip(output.token_ids, output.logprobs))
        step += 1
    assert engine.kv_cache.num_used_blocks == 0
    return got


def spy_preemptions(engine: LLMEngine) -> set[str]:
    """The ids of the requests the scheduler preempts from now on."""
    preempted: set[str] = set()
    schedule = engine.scheduler.schedule

    def spied():
        output = schedule()
        preempted.update(seq.request_id for seq in output.preempted)
        return output

    engine.scheduler.schedule = spied
    return preempted


@pytest.fixture(scope="module")
def demo_export(demo_model_dir, tmp_path_factory) -> Path:
    from export.onnx_export import ExportOptions, export_onnx

    out = tmp_path_factory.mktemp("demo_onnx") / "demo"
    export_onnx(ExportOptions(model_dir=demo_model_dir, out_dir=out, block_size=8, exporter="torchscript"))
    return out


@pytest.fixture(scope="module", params=["torch", "onnxruntime"])
def served(request, demo_model_dir) -> tuple[Path, str]:
    """(model folder, runner): the demo model, or its fp32 export."""
    if request.param == "torch":
        return demo_model_dir, "torch"
    return request.getfixturevalue("demo_export"), "onnxruntime"


@pytest.fixture(scope="module")
def alone(served) -> dict[int, list]:
    model_dir, runner = served
    return {seed: run(make_engine(model_dir, runner), seed) for seed in SEEDS}


SEEDS = (1, 2, 3)
SCENARIOS = {
    "eight others at once": (dict(), dict(others=8)),
    "others arriving step after step": (dict(), dict(others=8, arrive_at=(1, 2, 3, 5, 8, 13, 21, 34))),
    "prompt chunked by a small token budget": (dict(max_num_batched_tokens="16"), dict(others=8)),
    "prompt found in the prefix cache": (dict(), dict(others=3, before=PROMPT[:90] + " something else")),
    # NOTE: 224 KV slots for 9 requests of up to 140 tokens; the target comes last, so it is the
    # newest and the first preempted (fcfs).
    "preempted and recomputed": (dict(kv_cache_memory_bytes=str(14 * 32768), max_model_len="192"),
                                 dict(others=8, target_last=True)),
}


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_seeded_request_is_independent_of_its_batch(served, alone, scenario):
    model_dir, runner = served
    engine_params, batch = SCENARIOS[scenario]
    engine = make_engine(model_dir, runner, **engine_params)
    preempted = spy_preemptions(engine)
    for seed in SEEDS:
        got = run(engine, seed, **batch)
        assert [token for token, _ in got] == [token for token, _ in alone[seed]], f"seed {seed}: tokens differ"
        assert got == alone[seed], f"seed {seed}: same tokens, logprobs differ"
    assert (TARGET in preempted) == scenario.startswith("preempted")


def test_a_quantized_export_is_refused(demo_export, tmp_path):
    from export.quantization import resolve_preset, write_quantized

    write_quantized(demo_export, tmp_path / "int8", resolve_preset("int8", None, None))
    with pytest.raises(ConfigError, match=r"deterministic: .*int8 is quantized \(int8-dynamic-per-channel-7bit\), "
                                          r"and its logits depend on the requests batched with it"):
        make_engine(tmp_path / "int8", "onnxruntime")
    assert make_engine(tmp_path / "int8", "onnxruntime", deterministic="false").runner.manifest.quantization


def test_deterministic_is_validated(demo_model_dir):
    with pytest.raises(ConfigError, match="deterministic: not available with runner tensorrt"):
        make_engine(demo_model_dir, "tensorrt")
    with pytest.raises(ConfigError, match="deterministic: expected bool, got 'maybe'"):
        make_engine(demo_model_dir, "torch", deterministic="maybe")

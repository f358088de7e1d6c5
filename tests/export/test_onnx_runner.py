"""OnnxRunner: same greedy tokens as TorchRunner under real scheduling; pools bound once; clear errors."""

from __future__ import annotations

import shutil

import pytest

from lepton.batch import build_model_input
from lepton.block_manager import KVCacheManager
from lepton.config import RUNNERS, CacheConfig, EngineConfig, RunnerConfig, SchedulerConfig
from lepton.errors import ConfigError, ModelFolderError
from lepton.model_folder import ModelFolder
from lepton.runners import make_runner, open_folder
from lepton.runners.onnx_runner import OnnxRunner, open_export_folder
from lepton.runners.torch_runner import TorchRunner
from lepton.sampler import SamplingInput, sample
from lepton.sampling_params import SamplingParams
from lepton.scheduler import Scheduler
from lepton.sequence import FinishReason, Sequence, SequenceStatus
from lepton.tokenizer import Tokenizer

BLOCK_SIZE = 8
MAX_TOKENS = 12
# NOTE: two prompts share 2 full blocks, so the prefix cache hands the second one the first one's blocks.
PROMPTS = [list(range(40, 60)), list(range(40, 57)) + [7, 8, 9], [5, 6, 7], list(range(100, 131))]


def engine_config(model_dir, block_size=BLOCK_SIZE, memory="2M", runner="torch", dtype="float32") -> EngineConfig:
    return EngineConfig(
        model_dir=model_dir,
        cache=CacheConfig(block_size=block_size, kv_cache_memory_bytes=int(memory.rstrip("M")) << 20),
        scheduler=SchedulerConfig(max_num_batched_tokens=16, max_num_seqs=4),
        runner=RunnerConfig(runner=runner, dtype=dtype),
    )


def greedy_generate(runner, prompts: list[list[int]]) -> dict[str, list[int]]:
    """Scheduler + block manager + build_model_input + sampler around a runner, as the engine steps."""
    kv_cache = KVCacheManager(runner.num_blocks, runner.block_size, enable_prefix_caching=True)
    scheduler = Scheduler(SchedulerConfig(max_num_batched_tokens=16, max_num_seqs=4), kv_cache)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)
    seqs = [Sequence(f"r{i}", list(p), params, 1 << 20) for i, p in enumerate(prompts)]
    for seq in seqs:
        scheduler.add(seq)
    while scheduler.has_unfinished():
        output = scheduler.schedule()
        batch = build_model_input(output, runner.block_size)
        logits = runner.execute(batch)
        by_id = {seq.request_id: seq for seq in seqs}
        rows = [SamplingInput(params, by_id[r].prompt_token_ids, by_id[r].output_token_ids)
                for r in batch.sample_request_ids]
        scheduler.update(output, dict(zip(batch.sample_request_ids, sample(logits, rows).token_ids)))
        for seq in seqs:
            if seq.status is SequenceStatus.RUNNING and seq.num_output_tokens >= MAX_TOKENS:
                scheduler.finish(seq, FinishReason.LENGTH)
    return {seq.request_id: seq.output_token_ids for seq in seqs}


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_greedy_tokens_equal_torch_runner(tiny_exports, tiny_models, kind):
    out, _ = tiny_exports(kind)
    source = tiny_models(kind)
    config = engine_config(source)
    expected = greedy_generate(TorchRunner(ModelFolder.open(source), config), PROMPTS)
    onnx_runner = OnnxRunner(out, config)
    assert greedy_generate(onnx_runner, PROMPTS) == expected
    assert all(len(tokens) == MAX_TOKENS for tokens in expected.values())


def test_pools_are_allocated_once_and_bound_without_copies(tiny_exports, tiny_models):
    out, manifest = tiny_exports("llama")
    runner = OnnxRunner(out, engine_config(tiny_models("llama")))
    pools = runner.k_pools + runner.v_pools
    addresses = [pool.ctypes.data for pool in pools]
    assert [value.data_ptr() for value in runner.pool_values] == [
        addr for pair in zip(addresses[: len(pools) // 2], addresses[len(pools) // 2:]) for addr in pair
    ]
    greedy_generate(runner, PROMPTS[:2])
    assert [pool.ctypes.data for pool in runner.k_pools + runner.v_pools] == addresses
    assert any(pool.any() for pool in runner.k_pools), "K/V were never written into the bound pools"
    cfg = manifest.model_config
    assert runner.k_pools[0].shape == (runner.num_blocks, BLOCK_SIZE, cfg.num_kv_heads, cfg.head_dim)
    assert runner.num_blocks == TorchRunner(ModelFolder.open(tiny_models("llama")), engine_config(
        tiny_models("llama"))).num_blocks


def test_block_size_mismatch_is_a_clear_error(tiny_exports, tiny_models):
    out, _ = tiny_exports("llama")
    with pytest.raises(ConfigError, match="exported with block_size 8, the engine is configured with 16"):
        OnnxRunner(out, engine_config(tiny_models("llama"), block_size=16))


def test_dtype_other_than_the_graph_is_a_clear_error(tiny_exports, tiny_models):
    out, _ = tiny_exports("llama")
    with pytest.raises(ConfigError, match="computes in float32"):
        OnnxRunner(out, engine_config(tiny_models("llama"), dtype="bfloat16"))


def test_too_small_kv_budget_is_a_clear_error(tiny_exports, tiny_models):
    out, _ = tiny_exports("llama")
    config = EngineConfig(model_dir=tiny_models("llama"), cache=CacheConfig(block_size=BLOCK_SIZE, kv_cache_memory_bytes=100))
    with pytest.raises(ConfigError, match="hold no KV block"):
        OnnxRunner(out, config)


def test_export_folder_opens_for_serving(tiny_exports, tmp_path):
    out, _ = tiny_exports("llama")
    folder = open_export_folder(out)
    assert folder.weight_files == () and folder.model_type == "llama"
    assert Tokenizer.from_folder(folder).encode("hello")
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    (broken / "model.onnx").unlink()
    with pytest.raises(ModelFolderError, match="no model.onnx"):
        open_export_folder(broken)
    with pytest.raises(ModelFolderError, match="no manifest.json"):
        open_export_folder(tmp_path)


def test_make_runner_picks_torch_by_default(tiny_models):
    config = engine_config(tiny_models("llama"))
    assert isinstance(make_runner(open_folder(config), config), TorchRunner)


@pytest.mark.skipif("onnxruntime" not in RUNNERS, reason="lepton.config.RUNNERS does not list onnxruntime yet")
def test_engine_serves_an_export_folder_with_the_same_tokens(tiny_exports, tiny_models):
    from lepton.engine import LLMEngine

    out, _ = tiny_exports("llama")
    outputs = {}
    for runner, model_dir in (("torch", tiny_models("llama")), ("onnxruntime", out)):
        engine = LLMEngine(engine_config(model_dir, runner=runner))
        assert isinstance(engine.runner, OnnxRunner if runner == "onnxruntime" else TorchRunner)
        for i, prompt in enumerate(PROMPTS):
            engine.add_request(f"r{i}", prompt, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True))
        tokens: dict[str, list[int]] = {}
        while engine.has_unfinished():
            for result in engine.step():
                tokens.setdefault(result.request_id, []).extend(result.token_ids)
        outputs[runner] = tokens
    assert outputs["onnxruntime"] == outputs["torch"]

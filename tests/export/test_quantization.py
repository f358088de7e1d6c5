"""Quantized exports (int8, int4) of a tiny model: served by the engine, recipe in the manifest, quality gated."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from export.__main__ import main
from export.quality import EvalOptions, QualityGate, evaluate, format_table
from export.quantization import QuantizationError, QuantizeOptions, gemms_to_matmuls, quantize_export, resolve_preset
from lepton.config import CacheConfig, EngineConfig, RunnerConfig, SchedulerConfig
from lepton.runners.slot_cache import SLOT_STEP
from lepton.manifest import MANIFEST_FILE, Manifest, ManifestError, QuantizationRecipe, sha256_file
from lepton.sampling_params import SamplingParams

EVAL = EvalOptions(num_windows=2, window_len=32, latency_batch=2, latency_context=24, latency_steps=2)
LENIENT = QualityGate(0.0, math.inf, math.inf, math.inf, math.inf)
QUANTIZED_OPS = {"int8": "MatMulInteger", "int4": "MatMulNBits"}
PROMPTS = [list(range(40, 60)), [5, 6, 7], list(range(100, 131))]
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def quantized(tiny_exports, tmp_path_factory):
    """method -> (folder, manifest, report), quantized from the tiny dynamo export on first use."""
    source, _ = tiny_exports("llama", "dynamo")
    root = tmp_path_factory.mktemp("quantized")
    done: dict[str, tuple] = {}

    def get(method: str):
        if method not in done:
            options = QuantizeOptions(source, root / method, method, gate=LENIENT, evaluation=EVAL)
            done[method] = (root / method, *quantize_export(options))
        return done[method]

    return source, get


def generate(model_dir, runner="onnxruntime", attention="auto"):
    """Greedy tokens for PROMPTS through the engine, and the engine."""
    from lepton.engine import LLMEngine

    config = EngineConfig(model_dir=model_dir, cache=CacheConfig(block_size=8, kv_cache_memory_bytes=2 << 20),
                          scheduler=SchedulerConfig(max_num_batched_tokens=16, max_num_seqs=4),
                          runner=RunnerConfig(runner=runner, attention=attention))
    engine = LLMEngine(config)
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(f"r{i}", prompt, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True))
    tokens: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for result in engine.step():
            tokens.setdefault(result.request_id, []).extend(result.token_ids)
    return tokens, engine


@pytest.mark.parametrize("method", ["int8", "int4"])
@pytest.mark.parametrize("attention", ["paged", "slots"])
def test_engine_serves_the_quantized_export_with_pools_intact(quantized, method, attention):
    _, get = quantized
    out, _, _ = get(method)
    tokens, engine = generate(out, attention=attention)
    runner = engine.runner
    assert all(len(t) == MAX_TOKENS for t in tokens.values()) and len(tokens) == len(PROMPTS)
    vocab = runner.model_config.vocab_size
    assert all(0 <= token < vocab for t in tokens.values() for token in t)
    pools = runner.k_pools + runner.v_pools
    assert all(pool.dtype == np.float32 for pool in pools)
    if attention == "paged":
        assert sorted(v.data_ptr() for v in runner.pool_values) == sorted(p.ctypes.data for p in pools)
    else:  # NOTE: the graph reads the slots; every step's K/V are copied into the pools too
        assert runner.slots.num_slots == SLOT_STEP and 1 <= len(runner.slots.index) <= len(PROMPTS)
        assert runner.slots.refills == 0, "no request lost its slot, so none was refilled from the pools"
    assert all(pool.any() for pool in pools), "K/V were never written into the pools"


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_manifest_carries_the_typed_recipe(quantized, method):
    source, get = quantized
    out, manifest, _ = get(method)
    recipe = Manifest.load(out / MANIFEST_FILE).quantization
    assert isinstance(recipe, QuantizationRecipe) and recipe == manifest.quantization
    assert recipe.method == method and recipe.symmetric and recipe.tool.startswith("onnxruntime ")
    assert recipe.source_graph_sha256 == sha256_file(source / "model.onnx")
    assert (recipe.block_size, recipe.accuracy_level) == ((32, 4) if method == "int4" else (None, None))
    assert recipe.num_quantized == 9  # 2 layers x (qkv, o, gate_up, down) + lm_head
    graph = onnx.load(str(out / "model.onnx"))
    ops = [node.op_type for node in graph.graph.node]
    assert ops.count(QUANTIZED_OPS[method]) == 9 and "Gemm" not in ops
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    pools = [i for i in session.get_inputs() if "_pool_" in i.name]
    assert len(pools) == 4 and {i.type for i in pools} == {"tensor(float)"}
    assert manifest.source == Manifest.load(source / MANIFEST_FILE).source and manifest.validation == ()


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quality_report_is_written_with_every_field(quantized, method):
    _, get = quantized
    out, _, report = get(method)
    saved = json.loads((out / "quality.json").read_text())
    variant = saved["variants"][0]
    for key in ("kl_mean", "kl_p99", "top1_agreement", "max_abs_logit_error", "perplexity",
                "reference_perplexity", "step_ms", "reference_step_ms", "gate", "failures", "passed"):
        assert key in variant
    assert variant["passed"] and variant["num_positions"] == 2 * 31 and saved["evaluation"]["window_len"] == 32
    assert 0.0 <= report.top1_agreement <= 1.0 and report.kl_mean >= 0.0 and report.kl_p99 >= 0.0
    assert report.perplexity > 1.0 and report.step_ms > 0 and report.max_abs_logit_error > 0
    assert "| fp32 |" in (out / "quality.md").read_text() and f"| {method} |" in (out / "quality.md").read_text()


def test_combined_table_compares_all_variants_on_the_same_windows(quantized):
    source, get = quantized
    variants = {method: get(method)[0] for method in ("int8", "int4")}
    reports = evaluate(source, variants, EVAL)
    assert [r.name for r in reports] == ["int8", "int4"] and all(r.gate is not None for r in reports)
    assert reports[0].reference_perplexity == reports[1].reference_perplexity
    assert reports[0].kl_mean == pytest.approx(get("int8")[2].kl_mean)
    table = format_table(reports).splitlines()
    assert [line.split("|")[1].strip() for line in table if line.startswith("| ")][1:] == ["fp32", "int8", "int4"]


def test_a_threshold_not_met_fails_the_command_and_publishes_nothing(quantized, tmp_path, capsys):
    source, _ = quantized
    out = tmp_path / "strict"
    argv = ["quantize", "--export", str(source), "--out", str(out), "--method", "int4", "--max-kl-mean", "0",
            "--windows", "2", "--window-len", "32", "--latency-steps", "1", "--latency-context", "24"]
    assert main(argv) == 1
    message = capsys.readouterr().err
    assert "int4 quality gate failed" in message and "KL mean" in message and "> 0 (max)" in message
    assert not out.exists() and (tmp_path / "strict.tmp" / "quality.json").is_file()
    assert main(argv + ["--no-quality-gate"]) == 0 and (out / MANIFEST_FILE).is_file()


def test_gemm_rewrite_computes_the_same_products():
    rng = np.random.default_rng(0)
    w1, c1, w2 = rng.normal(size=(3, 4)), rng.normal(size=3), rng.normal(size=(3, 5))
    nodes = [helper.make_node("Gemm", ["x", "w1", "c1"], ["h"], name="g1", transB=1),
             helper.make_node("Gemm", ["h", "w2"], ["y"], name="g2")]
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for a, n in ((w1, "w1"), (c1, "c1"), (w2, "w2"))]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    x = rng.normal(size=(2, 4)).astype(np.float32)
    expected = _run(model, x)
    assert gemms_to_matmuls(model) == 2
    assert [n.op_type for n in model.graph.node] == ["MatMul", "Add", "MatMul"]
    assert sorted(t.name for t in model.graph.initializer) == ["c1", "w1.kn", "w2.kn"]
    np.testing.assert_allclose(_run(model, x), expected, rtol=1e-6, atol=1e-6)


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def test_bad_requests_are_clear_errors(quantized, tmp_path):
    _, get = quantized
    out, _, _ = get("int8")
    with pytest.raises(QuantizationError, match="already quantized"):
        quantize_export(QuantizeOptions(out, tmp_path / "again", "int4", evaluation=EVAL))
    with pytest.raises(QuantizationError, match="apply to int4 and q4_1 only"):
        resolve_preset("int8", 64, None)
    with pytest.raises(QuantizationError, match="power of two"):
        resolve_preset("int4", 48, None)
    data = json.loads((out / MANIFEST_FILE).read_text())
    data["quantization"]["bogus"] = 1
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(data))
    with pytest.raises(ManifestError, match=r"quantization: unknown keys \['bogus'\]"):
        Manifest.load(tmp_path / MANIFEST_FILE)

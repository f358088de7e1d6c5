"""q8_0: llama.cpp's 8-bit blocks with int8 activations, after SmoothQuant and with the worst inputs kept float32."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from export.nbits import RewritePlan, rewrite_matmuls
from export.quality import EvalOptions, QualityGate, teacher_forced_inputs
from export.quantization import (QuantizationError, QuantizeOptions, gemms_to_matmuls, quantize_export,
                                 resolve_preset, write_quantized)
from export.smoothing import (activation_ranges, block_int8_errors, calibration_feeds, smooth, smoothing_plan,
                              weight_product_inputs)
from export.training import calibration_windows, held_out_windows
from lepton.manifest import MANIFEST_FILE, Manifest
from tests.export.conftest import BLOCK_SIZE
from tests.export.test_q4_1 import greedy, matmul_model, q8_0_grid, run

EVAL = EvalOptions(num_windows=2, window_len=32, latency_batch=2, latency_context=24, latency_steps=2)
LENIENT = QualityGate(0.0, math.inf, math.inf, math.inf, math.inf)


@pytest.fixture(scope="module")
def tiny_export(tiny_exports):
    export, _ = tiny_exports("llama", "dynamo")  # NOTE: the default exporter (torchscript's chunks are Slices)
    return export


def feeds_of(export, windows: np.ndarray) -> list[dict]:
    cfg = Manifest.load(export / MANIFEST_FILE).model_config
    blocks = len(windows) * -(-windows.shape[1] // BLOCK_SIZE)
    return calibration_feeds(teacher_forced_inputs(windows, BLOCK_SIZE)[:1], blocks, BLOCK_SIZE, cfg.num_kv_heads,
                             cfg.head_dim, cfg.num_layers)


def logits_of(model: onnx.ModelProto, feed: dict) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(["logits"], feed)[0]


def test_smoothing_folds_into_norms_and_up_projections_and_keeps_the_function(tiny_export):
    model = onnx.load(str(tiny_export / "model.onnx"))
    gemms_to_matmuls(model)
    reference = onnx.ModelProto()
    reference.CopyFrom(model)
    plan = smoothing_plan(model)
    # NOTE: per layer the qkv and gate_up inputs (after the norms) and down_proj's (silu(gate) * up, up
    # the second half of the fused gate_up product); the final norm's output into the lm_head; never
    # o_proj's input (attention output has no foldable producer).
    assert sorted(fold.how for _, fold in plan.values()) == ["columns"] * 2 + ["vector"] * 5
    assert all(len(weights) == 1 for weights, _ in plan.values())
    up = [fold for _, fold in plan.values() if fold.how == "columns"]
    assert all("gate_up" in f.initializer and (f.start, f.stop) == (128, 256) for f in up)
    calibration = feeds_of(tiny_export, calibration_windows(tiny_export / "tokenizer.json", 4, 32))
    held_out = feeds_of(tiny_export, held_out_windows(tiny_export / "tokenizer.json", 2, 32))[0]
    ranges = activation_ranges(model, list(plan), calibration, num_threads=1)
    groups = smooth(model, ranges, plan, alpha=0.5)
    assert {g.activation for g in groups} == set(plan)
    before, after = logits_of(reference, held_out), logits_of(model, held_out)
    np.testing.assert_allclose(after, before, rtol=0, atol=1e-4 * np.abs(before).max())
    smoothed = activation_ranges(model, list(plan), calibration, num_threads=1)
    spread = lambda r: max(float(v.max() / np.median(v)) for v in r.values())  # noqa: E731
    assert spread(smoothed) < spread(ranges)


def test_block_errors_rank_the_inputs_that_int8_blocks_hurt(tiny_export):
    model = onnx.load(str(tiny_export / "model.onnx"))
    gemms_to_matmuls(model)
    vocab = Manifest.load(tiny_export / MANIFEST_FILE).model_config.vocab_size
    inputs = weight_product_inputs(model)
    assert len(inputs) == 2 * 4 + 1 and len(weight_product_inputs(model, skip_width=vocab)) == 8
    errors = block_int8_errors(model, inputs, feeds_of(tiny_export, calibration_windows(
        tiny_export / "tokenizer.json", 2, 32)), block_size=32, num_threads=1)
    # NOTE: half a step of 127 per block bounds the error; random activations sit near 1 % of their norm.
    assert set(errors) == set(inputs) and all(0.0 < e < 0.02 for e in errors.values())


def test_q8_0_body_products_are_within_int8_activation_error():
    rng = np.random.default_rng(4)
    layer, head = q8_0_grid(rng, 96, 64), q8_0_grid(rng, 200, 96)
    model = matmul_model({"layer": layer.T.copy(), "head": head.T.copy()}, rows=5)
    x = rng.normal(size=(5, 64)).astype(np.float32)
    expected = (x.astype(np.float64) @ layer.T) @ head.T
    plan = RewritePlan(block_size=32, accuracy_level=4, head_format="fp32", head_accuracy_level=4, vocab_size=200,
                       body_format="q8_0")
    assert rewrite_matmuls(model, plan) == 1
    nodes = {n.op_type: n for n in model.graph.node}
    assert {a.name: a.i for a in nodes["MatMulNBits"].attribute}["bits"] == 8 and "MatMul" in nodes
    assert np.abs(run(model, x) - expected).max() < 2e-2 * np.abs(expected).max()
    kept = matmul_model({"layer": layer.T.copy(), "head": head.T.copy()}, rows=5)
    plan = RewritePlan(32, 4, "q8_0", 4, 200, body_format="q8_0", keep_float=frozenset({"x"}))
    assert rewrite_matmuls(kept, plan) == 1 and [n.op_type for n in kept.graph.node][0] == "MatMul"


def test_q8_0_preset_is_smoothed_gated_recorded_and_served(tiny_export, tmp_path):
    manifest, report = quantize_export(QuantizeOptions(tiny_export, tmp_path / "q8_0", "q8_0", gate=LENIENT,
                                                       evaluation=EVAL))
    recipe = manifest.quantization
    assert recipe == Manifest.load(tmp_path / "q8_0" / MANIFEST_FILE).quantization
    assert (recipe.preset, recipe.method, recipe.block_size, recipe.accuracy_level) == (
        "q8_0-block32-acc4-head-q8_0-rescore64-smooth0.65", "q8_0", 32, 4)
    assert recipe.num_quantized == 9 and "export.nbits" in recipe.tool  # 2 layers x 4 + the 8-bit lm_head
    ops = [n.op_type for n in onnx.load(str(tmp_path / "q8_0" / "model.onnx")).graph.node]
    assert ops.count("MatMulNBits") == 9 and "Gemm" not in ops and "GatherBlockQuantized" not in ops
    assert ops.count("TopK") == 1 and ops.count("ScatterElements") == 1  # the head's top 64 rescored in float32
    assert report.passed and report.kl_mean < 0.01 and report.top1_agreement > 0.9
    assert all(len(tokens) == 8 for tokens in greedy(tmp_path / "q8_0").values())
    # NOTE: ceil(8 / 8) = 1 product, the input losing most to int8 blocks, stays a float32 MatMul.
    kept = write_quantized(tiny_export, tmp_path / "kept", resolve_preset("q8_0", None, None, float_share=0.125))
    assert kept.quantization.preset.endswith("-smooth0.65-float0.125") and kept.quantization.num_quantized == 7


def test_bad_q8_0_requests_are_clear_errors():
    with pytest.raises(QuantizationError, match="--smoothing-alpha applies to q8_0 only"):
        resolve_preset("int8", None, None, smoothing_alpha=0.5)
    with pytest.raises(QuantizationError, match=r"lies in \[0, 1\), got 1.0"):
        resolve_preset("q8_0", None, None, smoothing_alpha=1.0)
    with pytest.raises(QuantizationError, match="--smoothing-alpha applies to q8_0 only"):
        resolve_preset("q4_1", None, None, smoothing_alpha=0.5)
    with pytest.raises(QuantizationError, match="--float-share applies to q8_0 and q4_1 only"):
        resolve_preset("int4", None, None, float_share=0.1)
    with pytest.raises(QuantizationError, match="it applies to q4_1 at accuracy level 4, not 0"):
        resolve_preset("q4_1", None, 0, float_share=0.1)
    plain = resolve_preset("q8_0", None, None, "q8_0", smoothing_alpha=0.0, float_share=0.0)
    assert plain.name == "q8_0-block32-acc4-head-q8_0-rescore64" and not plain.smoothing_alpha

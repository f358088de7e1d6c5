"""llama.cpp's Q4_1 (and a Q8_0 lm_head) as MatMulNBits: exact on weights on those grids, served by the engine."""

from __future__ import annotations

import math
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from export.nbits import RewritePlan, block_indicator, quantize_q4_1, quantize_q8_0, rewrite_matmuls
from export.onnx_export import ExportOptions, export_onnx
from export.quality import EvalOptions, QualityGate
from export.quantization import QuantizationError, QuantizeOptions, quantize_export, resolve_preset, write_quantized
from lepton.config import EngineConfig
from lepton.engine import LLMEngine
from lepton.manifest import MANIFEST_FILE, Manifest
from lepton.sampling_params import SamplingParams
from lepton.server import PROJECT_ROOT
from tests.export.conftest import BLOCK_SIZE, build_tiny_model

EVAL = EvalOptions(num_windows=2, window_len=32, latency_batch=2, latency_context=24, latency_steps=2)
LENIENT = QualityGate(0.0, math.inf, math.inf, math.inf, math.inf)
PROMPTS = [list(range(40, 60)), [5, 6, 7], list(range(100, 131))]
SMOLLM2_MODEL = PROJECT_ROOT / "build" / "models" / "smollm2-135m-instruct"
SMOLLM2_EXPORT = PROJECT_ROOT / "build" / "onnx" / "smollm2"
CHAT_QUESTIONS = ("What is the capital of France?", "Write a haiku about the sea.",
                  "Give me three tips for staying focused while studying.")


def q4_1_grid(rng: np.random.Generator, rows: int, cols: int, block: int = 32) -> np.ndarray:
    """A weight exactly on a Q4_1 grid (fp16 d and m, as a GGUF holds them), each block spanning codes 0..15."""
    codes = rng.integers(0, 16, (rows, cols // block, block))
    codes[..., :2] = (0, 15)
    codes = rng.permuted(codes, axis=-1)
    scale = rng.uniform(1e-3, 4e-2, codes.shape[:2]).astype(np.float16).astype(np.float32)
    low = rng.uniform(-0.4, 0.0, codes.shape[:2]).astype(np.float16).astype(np.float32)
    return (codes * scale[..., None] + low[..., None]).astype(np.float32).reshape(rows, cols)


def q8_0_grid(rng: np.random.Generator, rows: int, cols: int, block: int = 32) -> np.ndarray:
    codes = rng.integers(-127, 128, (rows, cols // block, block))
    codes[..., 0] = 127
    scale = rng.uniform(1e-3, 1e-2, codes.shape[:2]).astype(np.float16).astype(np.float32)
    return (codes * scale[..., None]).astype(np.float32).reshape(rows, cols)


def test_q4_1_reproduces_a_weight_on_its_grid_and_bounds_the_error_off_it():
    rng = np.random.default_rng(0)
    weight = q4_1_grid(rng, 64, 256)
    block = quantize_q4_1(weight)
    assert block.codes.max() == 15 and block.codes.min() == 0 and block.bits == 4
    np.testing.assert_allclose(block.dequantize(), weight, rtol=0, atol=1e-6)
    noisy = rng.normal(size=(64, 256)).astype(np.float32)
    blocks = noisy.reshape(64, 8, 32)
    half_step = (blocks.max(-1) - blocks.min(-1)) / 30
    error = np.abs(quantize_q4_1(noisy).dequantize().reshape(64, 8, 32) - blocks).max(-1)
    assert (error <= half_step * (1 + 1e-5)).all()


def test_q8_0_reproduces_a_weight_on_its_grid():
    weight = q8_0_grid(np.random.default_rng(1), 48, 128)
    block = quantize_q8_0(weight)
    assert block.bits == 8 and block.offsets is None
    np.testing.assert_allclose(block.dequantize(), weight, rtol=0, atol=1e-7)


def test_q8_0_scales_are_float16_values_and_each_code_the_nearest_against_them():
    weight = np.random.default_rng(2).standard_normal((40, 96)).astype(np.float32) * 0.05
    block = quantize_q8_0(weight)
    scales = block.scales.astype(np.float64)
    assert block.scales.dtype == np.float32
    np.testing.assert_array_equal(block.scales.astype(np.float16).astype(np.float32), block.scales)
    blocks = weight.reshape(40, 3, 32).astype(np.float64)
    exact = np.abs(blocks).max(-1) / 127.0
    assert (np.abs(scales - exact) <= exact * 2.0 ** -11).all()  # NOTE: float16's rounding, half an ulp
    codes = block.codes.astype(np.int64) - 128
    assert np.abs(codes).max() <= 127
    unclipped = np.abs(blocks / scales[..., None]) <= 127
    np.testing.assert_array_equal(codes[unclipped], np.rint(blocks / scales[..., None])[unclipped])


def matmul_model(weights: dict[str, np.ndarray], rows: int) -> onnx.ModelProto:
    """x @ W1 @ W2 ...: MatMuls over [K, N] initializers, the float32 export's layout after gemms_to_matmuls."""
    names = list(weights)
    nodes = [helper.make_node("MatMul", ["x" if i == 0 else names[i - 1] + ".out", name], [name + ".out"], name=name)
             for i, name in enumerate(names)]
    first, last = weights[names[0]], weights[names[-1]]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, first.shape[0]])],
        [helper.make_tensor_value_info(names[-1] + ".out", TensorProto.FLOAT, [rows, last.shape[1]])],
        [numpy_helper.from_array(w, n) for n, w in weights.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


@pytest.mark.parametrize("head", ["q8_0", "fp32"])
def test_the_rewritten_graph_computes_the_grid_weights_products(head):
    rng = np.random.default_rng(2)
    layer, head_weight = q4_1_grid(rng, 96, 64), q8_0_grid(rng, 200, 96)  # [N, K]; the head has N = vocab
    model = matmul_model({"layer": layer.T.copy(), "head": head_weight.T.copy()}, rows=5)
    x = rng.normal(size=(5, 64)).astype(np.float32)
    hidden = x.astype(np.float64) @ layer.T
    expected = hidden @ head_weight.T
    plan = RewritePlan(block_size=32, accuracy_level=0, head_format=head, head_accuracy_level=4, vocab_size=200)
    assert rewrite_matmuls(model, plan) == (2 if head == "q8_0" else 1)
    onnx.checker.check_model(model)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("MatMulNBits") == (2 if head == "q8_0" else 1)
    assert "layer" not in {t.name for t in model.graph.initializer}
    assert block_indicator(64, 32).sum(axis=0).tolist() == [32, 32]
    out = run(model, x)
    if head == "fp32":
        # NOTE: accuracy level 0 and a float32 head: the exact product up to float32 rounding.
        np.testing.assert_allclose(out, expected, rtol=0, atol=1e-5 * np.abs(expected).max())
    else:
        # NOTE: the 8-bit head computes with int8 activations (accuracy level 4): ~1% of the largest logit.
        assert np.abs(out - expected).max() < 2e-2 * np.abs(expected).max()


def snap_to_grids(model_dir) -> None:
    """Put every linear weight of a model folder on a Q4_1 grid and the (tied) embedding on a Q8_0 grid."""
    from safetensors.numpy import load_file, save_file

    path = model_dir / "model.safetensors"
    tensors = load_file(path)
    for name, tensor in tensors.items():
        if name.endswith("proj.weight"):
            tensors[name] = quantize_q4_1(tensor).dequantize()
        elif name.endswith("embed_tokens.weight"):
            tensors[name] = quantize_q8_0(tensor).dequantize()
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.fixture(scope="module")
def grid_export(tmp_path_factory, demo_model_dir):
    """A tiny seeded llama whose weights lie on Q4_1 / Q8_0 grids, exported to ONNX (float32)."""
    root = tmp_path_factory.mktemp("q4_1")
    model_dir = build_tiny_model(root / "model", demo_model_dir, "llama")
    snap_to_grids(model_dir)
    export_onnx(ExportOptions(model_dir=model_dir, out_dir=root / "fp32", block_size=BLOCK_SIZE,
                              exporter="torchscript"))
    return root / "fp32"


def greedy(model_dir, max_tokens: int = 8, **params: str) -> dict[str, list[int]]:
    engine = LLMEngine(EngineConfig.from_parameters({
        "model_dir": str(model_dir), "runner": "onnxruntime", "block_size": str(BLOCK_SIZE),
        "kv_cache_memory_bytes": "2M", "max_num_seqs": "4", "max_num_batched_tokens": "16", **params}))
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(f"r{i}", prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
    tokens: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for result in engine.step():
            tokens.setdefault(result.request_id, []).extend(result.token_ids)
    return tokens


def test_exact_preset_serves_the_float32_models_tokens(grid_export, tmp_path):
    preset = resolve_preset("q4_1", None, 0, "fp32")  # accuracy level 0 and a float32 lm_head: exact
    manifest = write_quantized(grid_export, tmp_path / "q4_1", preset)
    recipe = manifest.quantization
    assert recipe.preset == "q4_1-block32-acc0-head-fp32" and recipe.method == "q4_1" and not recipe.symmetric
    assert recipe.num_quantized == 8  # 2 layers x (qkv, o, gate_up, down); the lm_head stays float32
    assert Manifest.load(tmp_path / "q4_1" / MANIFEST_FILE) == manifest
    # NOTE: as exported (MatMulNBits at level 0: float32 activations); Lepton's MatMulQ4 rounds them to bfloat16
    assert greedy(tmp_path / "q4_1", matmul_kernel="onnxruntime") == greedy(grid_export)


def test_default_preset_is_gated_and_recorded(grid_export, tmp_path):
    manifest, report = quantize_export(QuantizeOptions(grid_export, tmp_path / "q4_1", "q4_1", gate=LENIENT,
                                                       evaluation=EVAL))
    recipe = manifest.quantization
    assert recipe == Manifest.load(tmp_path / "q4_1" / MANIFEST_FILE).quantization
    assert (recipe.preset, recipe.block_size, recipe.accuracy_level) == (
        "q4_1-block32-acc4-head-q8_0-rescore64-float0.25", 32, 4)
    assert recipe.num_quantized == 9 and recipe.weight_type == "uint4" and "export.nbits" in recipe.tool
    nodes = onnx.load(str(tmp_path / "q4_1" / "model.onnx")).graph.node
    ops = [n.op_type for n in nodes]
    # NOTE: 8 layers' 4-bit products and the 8-bit head, its top candidates rescored from the float32 table
    assert ops.count("MatMulNBits") == 9 and "Gemm" not in ops and "GatherBlockQuantized" not in ops and "TopK" in ops
    # NOTE: the products of ceil(0.25 x 9 inputs) = 3 inputs, those losing most to int8 blocks, keep float
    # activations (accuracy level 0: 4-bit all the same); the rest and the head take int8 ones
    levels = {}
    for node in nodes:
        if node.op_type == "MatMulNBits":
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            levels.setdefault(node.input[0], set()).add((attrs["bits"], attrs["accuracy_level"]))
    floats = sum(level == {(4, 0)} for level in levels.values())
    assert len(levels) == 9 and floats in (2, 3)  # NOTE: 2 when the head's input is among the 3 (it stays 8-bit)
    assert sum(level == {(4, 4)} for level in levels.values()) == 8 - floats and {(8, 4)} in levels.values()
    assert report.passed and report.kl_mean < 0.01 and report.top1_agreement > 0.9
    head = write_quantized(grid_export, tmp_path / "q8_0", resolve_preset("q4_1", None, None, "q8_0", lm_head_rescore=0))
    assert head.quantization.preset == "q4_1-block32-acc4-head-q8_0-float0.25" and head.quantization.num_quantized == 9
    ops = [n.op_type for n in onnx.load(str(tmp_path / "q8_0" / "model.onnx")).graph.node]
    assert ops.count("MatMulNBits") == 9 and ops.count("GatherBlockQuantized") == 1
    assert all(len(tokens) == 8 for tokens in greedy(tmp_path / "q8_0").values())
    assert all(len(tokens) == 8 for tokens in greedy(tmp_path / "q4_1").values())


def test_a_quantized_lm_head_may_have_blocks_of_its_own(grid_export, tmp_path):
    preset = resolve_preset("q8_0", None, None, "q8_0", lm_head_block_size=16, lm_head_rescore=0)
    assert preset.name == "q8_0-block32-acc4-head-q8_0-block16-smooth0.65"
    manifest = write_quantized(grid_export, tmp_path / "q8_0", preset)
    assert manifest.quantization.num_quantized == 9  # 2 layers x 4 + the lm_head
    graph = onnx.load(str(tmp_path / "q8_0" / "model.onnx")).graph
    blocks = sorted(({a.name: helper.get_attribute_value(a) for a in n.attribute}["block_size"], n.op_type)
                    for n in graph.node if n.op_type in ("MatMulNBits", "GatherBlockQuantized"))
    # NOTE: the head and the tied embedding's Gather read the same 8-bit codes, in blocks of 16
    assert blocks == [(16, "GatherBlockQuantized"), (16, "MatMulNBits")] + [(32, "MatMulNBits")] * 8
    assert all(len(tokens) == 8 for tokens in greedy(tmp_path / "q8_0").values())


def test_bad_q4_1_requests_are_clear_errors():
    with pytest.raises(QuantizationError, match="--lm-head applies to q4_1 and q8_0 only"):
        resolve_preset("int4", None, None, "fp32")
    with pytest.raises(QuantizationError, match="one of fp32, q8_0, q4_1"):
        resolve_preset("q4_1", None, None, "int2")
    with pytest.raises(QuantizationError, match="--lm-head-block-size applies to a quantized lm_head"):
        resolve_preset("q8_0", None, None, "fp32", lm_head_block_size=16)
    with pytest.raises(QuantizationError, match="--lm-head-rescore applies to a quantized lm_head"):
        resolve_preset("q8_0", None, None, "fp32", lm_head_rescore=8)
    with pytest.raises(QuantizationError, match="--lm-head-rescore applies to a quantized lm_head"):
        resolve_preset("q4_1", None, None, "fp32", lm_head_rescore=8)
    with pytest.raises(QuantizationError, match=">= 0, got -1"):
        resolve_preset("q8_0", None, None, lm_head_rescore=-1)
    # NOTE: the q8_0 preset's rescoring belongs to its 8-bit head: a float32 head alone turns it off.
    assert resolve_preset("q8_0", None, None, "fp32").name == "q8_0-block32-acc4-head-fp32-smooth0.65"
    with pytest.raises(QuantizationError, match="power of two >= 16, got 24"):
        resolve_preset("q8_0", None, None, "q8_0", lm_head_block_size=24)


@pytest.mark.skipif(not (SMOLLM2_MODEL / "config.json").is_file(), reason="no SmolLM2 folder (export smollm2)")
def test_smollm2_layer_weights_lie_on_the_q4_1_grid_and_the_embedding_on_q8_0():
    from safetensors import safe_open

    with safe_open(SMOLLM2_MODEL / "model.safetensors", "np") as weights:
        for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.17.mlp.down_proj.weight"):
            weight = weights.get_tensor(name)
            np.testing.assert_allclose(quantize_q4_1(weight).dequantize(), weight, rtol=0, atol=1e-6)
        embedding = weights.get_tensor("model.embed_tokens.weight")[:4096]
        np.testing.assert_allclose(quantize_q8_0(embedding).dequantize(), embedding, rtol=0, atol=1e-6)


def smollm2_float32_export(tmp_path):
    """build/onnx/smollm2 when it is SmolLM2's float32 export; else exported here (without validation)."""
    if (SMOLLM2_EXPORT / MANIFEST_FILE).is_file():
        manifest = Manifest.load(SMOLLM2_EXPORT / MANIFEST_FILE)
        if manifest.quantization is None and manifest.model_config.vocab_size == 49152:
            return SMOLLM2_EXPORT
    export_onnx(ExportOptions(model_dir=SMOLLM2_MODEL, out_dir=tmp_path / "fp32", validate=False))
    return tmp_path / "fp32"


@pytest.mark.skipif(not (SMOLLM2_MODEL / "config.json").is_file(), reason="no SmolLM2 folder (export smollm2)")
def test_smollm2_q4_1_answers_as_transformers_on_the_float32_folder(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from export.smollm2 import greedy_ids
    from lepton.chat import parse_messages

    # NOTE: float activations (accuracy level 0: Lepton's MatMulQ4 rounds them to bfloat16) and the 8-bit head's
    # top 64 rescored in float32. The preset's int8 activations are judged by its gate instead: they flip knife
    # edges (the first answer's first token: "The" 25.325 against "L" 25.243 in float32; "L'Étoile, ..." then).
    write_quantized(smollm2_float32_export(tmp_path), tmp_path / "q4_1", resolve_preset("q4_1", None, 0))
    engine = LLMEngine(EngineConfig.from_parameters({
        "model_dir": str(tmp_path / "q4_1"), "runner": "onnxruntime", "max_model_len": "512",
        "kv_cache_memory_bytes": "32M"}))
    model = AutoModelForCausalLM.from_pretrained(SMOLLM2_MODEL, dtype=torch.float32, use_safetensors=True,
                                                 local_files_only=True).eval()
    for i, question in enumerate(CHAT_QUESTIONS):
        prompt_ids = engine.tokenizer.encode_chat(parse_messages([{"role": "user", "content": question}]))
        engine.add_request(f"q{i}", prompt_ids, SamplingParams(max_tokens=16, temperature=0.0))
        token_ids, text = [], ""
        while engine.has_unfinished():
            for output in engine.step():
                token_ids += output.token_ids
                text += output.text
        assert token_ids == list(greedy_ids(model, prompt_ids, 16)), question
        if i == 0:
            assert text.startswith("The capital of France is Paris.")
    shutil.rmtree(tmp_path / "q4_1")


def tied_head_model(table: np.ndarray, head: np.ndarray | None = None) -> onnx.ModelProto:
    """Gather(table, ids) -> h; logits = h @ head^T (head: the table, a tied embedding and lm_head, unless
    given), h also an output."""
    head = table if head is None else head
    vocab, hidden = table.shape
    nodes = [helper.make_node("Gather", ["table", "ids"], ["h"], name="embed", axis=0),
             helper.make_node("MatMul", ["h", "table.kn"], ["logits"], name="head")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["T"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["T", vocab]),
         helper.make_tensor_value_info("h", TensorProto.FLOAT, ["T", hidden])],
        [numpy_helper.from_array(table, "table"), numpy_helper.from_array(head.T.copy(), "table.kn")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def with_output(model: onnx.ModelProto, name: str) -> onnx.ModelProto:
    model.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, ["T", "V"]))
    return model


def assert_rescored(logits: np.ndarray, approx: np.ndarray, exact: np.ndarray, count: int) -> None:
    """logits = the 8-bit head's approx with each row's top `count` of approx replaced by the exact logits."""
    scale = np.abs(exact).max()
    assert 1e-3 * scale < np.abs(approx - exact).max() < 2e-2 * scale  # NOTE: the 8-bit head errs, a little
    top = np.argsort(-approx, axis=1)[:, :count]
    expected = approx.astype(np.float64).copy()
    np.put_along_axis(expected, top, np.take_along_axis(exact, top, axis=1), axis=1)
    np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-5 * scale)
    assert (logits.argmax(axis=1) == exact.argmax(axis=1)).all()


@pytest.mark.parametrize("smoothed", [False, True])
def test_a_rescored_head_computes_its_top_candidates_in_float32_from_the_tied_table(smoothed):
    rng = np.random.default_rng(5)
    table = rng.normal(size=(300, 64)).astype(np.float32)  # NOTE: off the Q8_0 grid, so the 8-bit head errs
    # NOTE: smoothing scales the head's input columns (1 / s folded into the final norm): head = table * s.
    scale = rng.uniform(0.2, 5.0, 64) if smoothed else np.ones(64)
    head = (table * scale).astype(np.float32)
    model = tied_head_model(table, head)
    plan = RewritePlan(block_size=32, accuracy_level=0, head_format="q8_0", head_accuracy_level=4, vocab_size=300,
                       head_rescore=8)
    assert rewrite_matmuls(model, plan) == 1
    onnx.checker.check_model(with_output(model, "head.approx"))
    ops = [n.op_type for n in model.graph.node]
    assert ops == ["Gather", "MatMulNBits"] + ["Mul"] * smoothed + [
        "TopK", "Gather", "Unsqueeze", "MatMul", "Squeeze", "ScatterElements"]
    # NOTE: the float32 table serves the embedding and the candidates' rows; no float32 head stays.
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    assert {"table", "head.codes", "head.scales"} <= set(inits) and not {"table.kn", "head.rows"} & set(inits)
    if smoothed:
        np.testing.assert_allclose(inits["head.rescore_scale"], scale, rtol=1e-6)
    ids = rng.integers(0, 300, 9).astype(np.int64)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    logits, rows, approx = session.run(None, {"ids": ids})
    np.testing.assert_array_equal(rows, table[ids])
    assert_rescored(logits, approx, table[ids].astype(np.float64) @ head.T.astype(np.float64), 8)


def test_an_untied_rescored_head_keeps_a_float32_copy_of_its_rows():
    rng = np.random.default_rng(6)
    layer, head = rng.normal(size=(64, 48)).astype(np.float32), rng.normal(size=(250, 64)).astype(np.float32)
    model = matmul_model({"layer": layer.T.copy(), "head": head.T.copy()}, rows=6)
    plan = RewritePlan(block_size=32, accuracy_level=4, head_format="q8_0", head_accuracy_level=4, vocab_size=250,
                       head_rescore=300)  # NOTE: more candidates than the vocabulary: every logit in float32
    assert rewrite_matmuls(model, plan) == 1  # NOTE: body_format q4_1 needs K % 32: 48 is not, "layer" stays
    rows = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}["head.rows"]
    np.testing.assert_array_equal(rows, head)
    x = rng.normal(size=(6, 48)).astype(np.float32)
    session = ort.InferenceSession(with_output(model, "head.approx").SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    logits, approx = session.run(None, {"x": x})
    exact = (x.astype(np.float64) @ layer.T) @ head.T
    assert_rescored(logits, approx, exact, 250)


def test_a_tied_embedding_reads_the_q8_0_heads_codes():
    rng = np.random.default_rng(3)
    table = q8_0_grid(rng, 200, 64)  # [vocab, hidden], tied: the Gather's table and the head's weight
    nodes = [helper.make_node("Gather", ["table", "ids"], ["h"], name="embed", axis=0),
             helper.make_node("MatMul", ["h", "table.kn"], ["logits"], name="head")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["T"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["T", 200]),
         helper.make_tensor_value_info("h", TensorProto.FLOAT, ["T", 64])],
        [numpy_helper.from_array(table, "table"), numpy_helper.from_array(table.T.copy(), "table.kn")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    plan = RewritePlan(block_size=32, accuracy_level=0, head_format="q8_0", head_accuracy_level=4, vocab_size=200)
    assert rewrite_matmuls(model, plan) == 1
    assert {t.name for t in model.graph.initializer}.isdisjoint({"table", "table.kn"})
    assert "GatherBlockQuantized" in [n.op_type for n in model.graph.node]
    ids = np.array([0, 7, 199, 7], np.int64)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    logits, rows = session.run(None, {"ids": ids})
    np.testing.assert_array_equal(rows, table[ids])
    expected = table[ids].astype(np.float64) @ table.T
    assert np.abs(logits - expected).max() < 2e-2 * np.abs(expected).max()

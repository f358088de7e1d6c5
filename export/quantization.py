"""Quantize a float32 export folder (INT8 dynamic, 4-bit weight-only, llama.cpp's Q4_1), gated on quality."""

from __future__ import annotations

import dataclasses
import importlib
import logging
import math
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from export.nbits import RewritePlan, rewrite_matmuls
from export.onnx_export import COPIED_FILES, MAX_INLINE_BYTES, check_pool_reads
from export.quality import (REPORT_FILE, EvalOptions, QualityGate, VariantQuality, evaluate, require_gate,
                            teacher_forced_inputs, write_report)
from export.smoothing import (activation_ranges, block_int8_errors, calibration_feeds, smooth, smoothing_plan,
                              weight_product_inputs)
from export.training import calibration_windows
from lepton.manifest import MANIFEST_FILE, Manifest, QuantizationRecipe, sha256_file, tool_versions
from lepton.runners.graph_edit import drop_unused_initializers
from lepton.runners.onnx_runner import INDEX_INPUTS
from lepton.runners.q4_graph import INT8_LEVEL

METHODS = ("int8", "int4", "q4_1", "q8_0")
QUANTIZED_OPS = {"int8": ("MatMulInteger",), "int4": ("MatMulNBits",), "q4_1": ("MatMulNBits",),
                 "q8_0": ("MatMulNBits",)}
# NOTE: int8 (one activation scale per tensor) with smoothing was tried on SmolLM2: KL 0.45 -> 0.116
# (alpha 0.65) and 0.079 (alpha 0.85, a quarter of the products in float32), far from the gate; so q8_0 only.
SMOOTHED = ("q8_0",)  # methods whose int8 activations smoothing applies to
# NOTE: SmoothQuant before q4_1 (alpha 0.65, accuracy level 4) was tried on SmolLM2 (2026-12-05): KL 0.1126, top-1
# 0.822: the smoothing scales (down_proj's input had a channel 2,397x its median) widen the 4-bit blocks they
# multiply, and 16 levels cannot hold them. So q4_1 keeps its weights and the inputs losing most to int8 blocks
# keep float activations instead (float_share).
FLOAT_SHARED = ("q8_0", "q4_1")  # methods whose worst int8 activations a float_share keeps in float
HEAD_FORMATS = ("fp32", "q8_0", "q4_1")  # q4_1 / q8_0 methods: how the lm_head (N = vocab) is stored


class QuantizationError(RuntimeError):
    """The export cannot be quantized as asked."""


@dataclass(frozen=True)
class QuantizationPreset:
    """A named setting; the CLI may override block_size and accuracy_level (int4)."""

    name: str
    method: str
    weight_type: str  # "int8" (signed) or "uint8" for int8; "int4" for int4
    per_channel: bool
    block_size: int | None
    symmetric: bool
    accuracy_level: int | None  # MatMulNBits: 1 = fp32 compute, 4 = int8 compute
    reduce_range: bool
    lm_head: str = "same"  # q4_1: "fp32", "q8_0" (8-bit blocks, accuracy level 4) or "q4_1"; others: as the rest
    smoothing_alpha: float = 0.0  # q8_0: SmoothQuant's migration strength (export.smoothing); 0 = none
    float_share: float = 0.0  # this share of the weight products' inputs, those losing most to int8 blocks (after
    # smoothing), keep float32 products (q8_0) or 4-bit products with float activations (q4_1 at accuracy level 4)
    lm_head_block_size: int | None = None  # q4_1 / q8_0: weights per scale of a quantized lm_head (None: block_size)
    lm_head_rescore: int = 0  # a quantized lm_head: its top candidates' logits recomputed in float32 (0 = none)


# NOTE: measured on this AVX2 CPU (no VNNI). int8: ORT's u8s8 kernel sums pairs of u8 x s8 products
# in saturating int16 (vpmaddubsw), so full-range int8 weights lost accuracy (KL 0.0049, top-1 0.90 on
# the trained demo); 7-bit weights (reduce_range) fixed it (KL 0.0006, top-1 0.97) and were the fastest
# int8 kernel (2.0-2.6x fp32 on a 576x1536 MatMul at 8 and 256 rows; u8u8: 1.5x). int4: accuracy
# level 4 (int8 compute) matched fp32 to 6.7x faster on large weights, while level 1 (fp32 compute)
# was slower than fp32 at decode batch sizes. Every non-MatMul op, the embedding and the K/V pools
# stay float32.
# q4_1 (export/nbits.py), measured on SmolLM2-135M-Instruct (dequantized from a Q4_1 GGUF; AVX-512 VNNI EPYC,
# 2 shared cores, 4,080 held-out predictions): accuracy level 0 with a float32 head reproduces the float32
# export (KL 2e-11, top-1 1.000, max |logit err| 2e-4); the head as Q8_0 (the GGUF's embedding is on a Q8_0
# grid, so its weights stay exact; error only from level 4's int8 activations) gives KL 0.0011, top-1 0.978
# and a faster step, but its greedy answer to "What is the capital of France?" starts "L'Étoile" instead of
# transformers' "The capital of France is Paris.", so the default head stays float32 (exact). Level 4 for the
# 4-bit layers gives KL 0.0040, top-1 0.962 (spread over all projections: level 0 for down_proj alone left
# KL at 0.0039), failing the gate. With --lm-head q8_0 a Gather over the tied embedding reads the head's
# 8-bit codes (GatherBlockQuantized) instead of a float copy.
# The preset since 2026-12-05 (served by Lepton's MatMulQ4 on AVX-512 BF16, lepton/runners/q4_graph.py: the 4-bit
# layers with bfloat16 activations, the head through MatMulQ8): the head in 8-bit blocks with each row's top 64
# candidates rescored in float32 (as q8_0's preset), measured through the runner: KL 0.0003, p99 0.0015, top-1
# 0.994, perplexity 27.478 (float32 27.459; the float32 head, served the same way: 0.0001, 0.0006, 0.990, 27.469),
# the same greedy answers as transformers on six chat prompts; one decode 5.6 vs 6.2 ms, 16 decodes 20.7 vs 27.0
# (benchmarks.step_shapes). --accuracy-level 0 --lm-head fp32 with matmul_kernel=onnxruntime is the exact recipe.
# The preset since 2026-12-05 evening (AVX-512 VNNI EPYC, SmolLM2, 4,080 held-out predictions, measured through the
# runner: MatMulQ4's int8 activations, lepton/native/q4_matmul.c): accuracy level 4 with the codes centred on 8 in
# the integer dot, KL 0.0031, p99 0.0155, top-1 0.967, max |logit err| 3.35 (fails; uncentred codes gave 0.0097);
# with SmoothQuant (alpha 0.65) 0.1126 (see SMOOTHED); the quarter of the inputs losing most to int8 blocks kept
# at level 0 (float_share 0.25: 26 of the 30 attention inputs, 2 of down_proj's, 1 each of o_proj's and
# gate_up's) KL 0.0013, p99 0.0061, top-1 0.982, max |logit err| 1.63, perplexity 27.502: passes. A 16-decode
# step 19.3 -> 17.5 ms, a 128-token prompt 90 -> 74 ms (benchmarks.step_shapes; q8_0 16.4 / 60). Greedy answers
# against transformers (16 tokens, six chat questions): equal on 3 (level 0: 5, float_share 0.5: 5, q8_0's
# preset: 3); "What is the capital of France?" flips at its first token, "The" 25.325 against "L" 25.243 in
# float32.
# q8_0 (export.nbits + export.smoothing), SmolLM2, 2,040 held-out predictions (2026-12-03): int8 activations
# in blocks of 32 (accuracy level 4) are the error, not the 8-bit weights: unsmoothed KL 0.0051 (head q8_0),
# 0.0040 (head fp32). SmoothQuant folded into the norms and into the up half of gate_up (91 of 121 inputs;
# down_proj's had a channel 2,397x its median) with alpha 0.65 and the head in float32: KL 0.0015, p99
# 0.0084, top-1 0.975, max |logit err| 1.48, perplexity 27.519 vs 27.459: passes the int8 gate. Keeping
# the inputs with the largest block error in float32 (float_share 0.0625 / 0.125) lowers KL to 0.0012 /
# 0.0011 at 1.1-1.2x the step, so it is off by default. Its step is 0.6-0.85x fp32's for 16 decodes and
# about fp32's for a 128-token prefill here: MatMulNBits' 8-bit kernels are ~1.5x slower than int8's
# DynamicQuantizeMatMul (which keeps one activation scale per tensor and fails the gate, KL 0.45).
# The head in 8 bits too (2026-12-04, AVX2 EPYC): blocks of 32 KL 0.00215 (fails); the head alone in blocks of
# 16 KL 0.0019, max |logit err| 1.92 (passes barely) for a one-decode step 0.85-0.9x, others level.
# The preset (2026-12-04, AVX-512 VNNI EPYC): the head in 8-bit blocks of 32 with each row's top 64 candidates
# rescored in float32 from the tied embedding (export.nbits.rescore_nodes): KL 0.0016, p99 0.0087, top-1 0.976,
# perplexity 27.507 (float32 head: 0.0015, 0.0086, 0.976, 27.497), the same greedy tokens on six chat prompts;
# one decode 0.76x, 16 decodes 0.94x, a 128-token prefill 0.97x the float32 head's step (benchmarks.step_shapes).
PRESETS = {
    "int8": QuantizationPreset("int8-dynamic-per-channel-7bit", "int8", "int8", True, None, True, None, True),
    "int4": QuantizationPreset("int4-block32-sym-acc4", "int4", "int4", False, 32, True, 4, False),
    "q4_1": QuantizationPreset("q4_1-block32-acc4-head-q8_0-rescore64-float0.25", "q4_1", "uint4", False, 32, False, 4,
                               False, "q8_0", float_share=0.25, lm_head_rescore=64),
    "q8_0": QuantizationPreset("q8_0-block32-acc4-head-q8_0-rescore64-smooth0.65", "q8_0", "int8", False, 32, True,
                               4, False, "q8_0", smoothing_alpha=0.65, float_share=0.0, lm_head_rescore=64),
}
CALIBRATION_WINDOWS = 16  # q8_0 smoothing: prefills of 16 x 128 tokens of training text
CALIBRATION_LENGTH = 256
Q8_HEAD_ACCURACY_LEVEL = 4  # NOTE: bits=8 MatMulNBits at level 0 ran 17 ms for N = 8192, K = 576 (fp32: 0.8 ms)


@dataclass(frozen=True)
class QuantizeOptions:
    """What `python -m export quantize` was asked to do."""

    export_dir: Path  # a float32 export folder (python -m export onnx)
    out_dir: Path
    method: str  # "int8", "int4", "q4_1" or "q8_0"
    block_size: int | None = None  # int4 / q4_1 / q8_0 block size override
    accuracy_level: int | None = None  # int4 / q4_1 / q8_0 accuracy level override
    lm_head: str | None = None  # q4_1 / q8_0 lm_head format override (HEAD_FORMATS)
    lm_head_block_size: int | None = None  # q4_1 / q8_0: a quantized lm_head's block size override
    lm_head_rescore: int | None = None  # a quantized lm_head: top candidates rescored in float32, override
    smoothing_alpha: float | None = None  # q8_0 smoothing strength override (0 = none)
    float_share: float | None = None  # q8_0 / q4_1: share of activations kept in float (see the preset), override
    gate: QualityGate | None = None  # None = the method's default gate (quality.GATES)
    quality_gate: bool = True  # False: report quality, never fail on it
    evaluation: EvalOptions = EvalOptions()


def resolve_preset(method: str, block_size: int | None, accuracy_level: int | None,
                   lm_head: str | None = None, smoothing_alpha: float | None = None,
                   float_share: float | None = None, lm_head_block_size: int | None = None,
                   lm_head_rescore: int | None = None) -> QuantizationPreset:
    """The method's preset with CLI overrides applied and checked."""
    if method not in PRESETS:
        raise QuantizationError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    preset = PRESETS[method]
    if method == "int8" and (block_size is not None or accuracy_level is not None):
        raise QuantizationError("--block-size and --accuracy-level apply to int4 and q4_1 only (int8 is per channel)")
    if lm_head is not None and (method not in ("q4_1", "q8_0") or lm_head not in HEAD_FORMATS):
        raise QuantizationError(f"--lm-head applies to q4_1 and q8_0 only and is one of {', '.join(HEAD_FORMATS)}")
    if smoothing_alpha is not None and (method not in SMOOTHED or not 0.0 <= smoothing_alpha < 1.0):
        raise QuantizationError(f"--smoothing-alpha applies to q8_0 only and lies in [0, 1), got {smoothing_alpha}")
    if float_share is not None and (method not in FLOAT_SHARED or not 0.0 <= float_share < 1.0):
        raise QuantizationError(f"--float-share applies to q8_0 and q4_1 only and lies in [0, 1), got {float_share}")
    for size in (block_size, lm_head_block_size):
        if size is not None and (size < 16 or size & (size - 1)):
            raise QuantizationError(f"block size must be a power of two >= 16, got {size}")
    if accuracy_level is not None and accuracy_level not in (0, 1, 2, 3, 4):
        raise QuantizationError(f"accuracy level must be 0..4 (see MatMulNBits), got {accuracy_level}")
    if method == "q4_1" and accuracy_level not in (None, INT8_LEVEL):
        if float_share:
            raise QuantizationError(f"--float-share keeps float activations where the rest are int8: it applies to q4_1 "
                                    f"at accuracy level {INT8_LEVEL}, not {accuracy_level}")
        float_share = 0.0  # NOTE: every activation is float already
    preset = dataclasses.replace(
        preset,
        block_size=preset.block_size if block_size is None else block_size,
        accuracy_level=preset.accuracy_level if accuracy_level is None else accuracy_level,
        lm_head=preset.lm_head if lm_head is None else lm_head,
        smoothing_alpha=preset.smoothing_alpha if smoothing_alpha is None else smoothing_alpha,
        float_share=preset.float_share if float_share is None else float_share,
        lm_head_block_size=preset.lm_head_block_size if lm_head_block_size is None else lm_head_block_size,
        # NOTE: the preset's rescoring goes with its quantized head: --lm-head fp32 alone turns it off.
        lm_head_rescore=(lm_head_rescore if lm_head_rescore is not None
                         else preset.lm_head_rescore if (lm_head or preset.lm_head) in ("q8_0", "q4_1") else 0),
    )
    if preset.lm_head_block_size is not None and preset.lm_head not in ("q8_0", "q4_1"):
        raise QuantizationError(f"--lm-head-block-size applies to a quantized lm_head (--lm-head q8_0 or q4_1), "
                                f"not to {preset.lm_head}")
    if preset.lm_head_rescore and (preset.lm_head not in ("q8_0", "q4_1") or preset.lm_head_rescore < 0):
        raise QuantizationError(f"--lm-head-rescore applies to a quantized lm_head (--lm-head q8_0 or q4_1) and is "
                                f">= 0, got {preset.lm_head_rescore} with --lm-head {preset.lm_head}")
    if method in ("q4_1", "q8_0"):
        name = f"{method}-block{preset.block_size}-acc{preset.accuracy_level}-head-{preset.lm_head}"
        name += f"-block{preset.lm_head_block_size}" if preset.lm_head_block_size else ""
        name += f"-rescore{preset.lm_head_rescore}" if preset.lm_head_rescore else ""
        name += f"-smooth{preset.smoothing_alpha:g}" if preset.smoothing_alpha else ""
        name += f"-float{preset.float_share:g}" if preset.float_share else ""
        preset = dataclasses.replace(preset, name=name)
    return preset


def gemms_to_matmuls(model: onnx.ModelProto) -> int:
    """Rewrite Gemm(A, W) over a weight initializer as MatMul(A, W as [K, N]) (+ Add of C); returns how many."""
    graph = model.graph
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in graph.node for a in n.attribute):
        raise QuantizationError("the graph has subgraphs (If/Loop/Scan); the step graph never does")
    weights = {t.name: t for t in graph.initializer}
    transposed: dict[str, str] = {}
    nodes, count = [], 0
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        plain = attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0 and not attrs.get("transA", 0)
        if node.op_type != "Gemm" or node.input[1] not in weights or not plain:
            nodes.append(node)
            continue
        name = node.input[1]
        if name not in transposed:
            matrix = numpy_helper.to_array(weights[name])
            matrix = np.ascontiguousarray(matrix.T if attrs.get("transB", 0) else matrix)
            transposed[name] = f"{name}.kn"
            graph.initializer.append(numpy_helper.from_array(matrix, transposed[name]))
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        product = f"{node.output[0]}.matmul" if bias else node.output[0]
        nodes.append(helper.make_node("MatMul", [node.input[0], transposed[name]], [product], name=node.name))
        if bias:
            nodes.append(helper.make_node("Add", [product, bias], [node.output[0]], name=f"{node.name}.bias"))
        count += 1
    graph.ClearField("node")
    graph.node.extend(nodes)
    drop_unused_initializers(graph)
    return count



def quantize_graph(source: Path, target: Path, preset: QuantizationPreset, manifest: Manifest) -> int:
    """Write the quantized graph of source (described by manifest, tokenizer beside it) to target;
    returns the number of weight matrices quantized."""
    model = onnx.load(str(source))
    gemms_to_matmuls(model)
    vocab_size = manifest.model_config.vocab_size
    keep_float: frozenset[str] = frozenset()
    if preset.smoothing_alpha or preset.float_share:
        keep_float = calibrate_q8(model, source.parent, manifest, preset)
    with _quiet_root_logger():
        if preset.method == "int8":
            _quantize_int8(model, target, preset)
        elif preset.method == "int4":
            _quantize_int4(model, target, preset)
        else:
            _quantize_blocks(model, target, preset, vocab_size, keep_float)
    quantized = onnx.load(str(target), load_external_data=False)
    count = sum(node.op_type in QUANTIZED_OPS[preset.method] for node in quantized.graph.node)
    if count == 0:
        raise QuantizationError(f"{source}: no MatMul with a constant weight was found to quantize")
    onnx.checker.check_model(str(target))
    pools = [i.name for i in quantized.graph.input if i.name not in INDEX_INPUTS]
    check_pool_reads(quantized.graph, pools)
    return count


@contextmanager
def _quiet_root_logger():
    """ORT's quantizers log every skipped node on the root logger; the recipe is their summary."""
    root = logging.getLogger()
    level = root.level
    # NOTE: importing the 4-bit quantizer runs logging.basicConfig(level=INFO); import first, then quiet.
    importlib.import_module("onnxruntime.quantization.matmul_nbits_quantizer")
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _quantize_int8(model: onnx.ModelProto, target: Path, preset: QuantizationPreset) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    weight_type = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}[preset.weight_type]
    # NOTE: MatMulConstBOnly: only MatMuls with a weight initializer; attention's activation x
    # activation products (and so everything read from the K/V pools) stay float32.
    with tempfile.TemporaryDirectory() as scratch:
        staged = Path(scratch) / "prepared.onnx"
        onnx.save_model(model, str(staged), save_as_external_data=model.ByteSize() > MAX_INLINE_BYTES)
        quantize_dynamic(staged, target, op_types_to_quantize=["MatMul"], per_channel=preset.per_channel,
                         reduce_range=preset.reduce_range, weight_type=weight_type,
                         use_external_data_format=model.ByteSize() > MAX_INLINE_BYTES,
                         extra_options={"MatMulConstBOnly": True, "WeightSymmetric": preset.symmetric})


def _quantize_int4(model: onnx.ModelProto, target: Path, preset: QuantizationPreset) -> None:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(model, bits=4, block_size=preset.block_size, is_symmetric=preset.symmetric,
                                     accuracy_level=preset.accuracy_level, op_types_to_quantize=("MatMul",))
    quantizer.process()
    _save(quantizer.model.model, target)


def calibrate_q8(model: onnx.ModelProto, export_dir: Path, manifest: Manifest, preset: QuantizationPreset,
                 num_windows: int = CALIBRATION_WINDOWS, length: int = CALIBRATION_LENGTH) -> frozenset[str]:
    """SmoothQuant on the graph in place, then the preset's float_share of activations with the largest int8
    block error (both calibrated on prefills of training text, export.smoothing); returns those."""
    cfg = manifest.model_config
    windows = calibration_windows(export_dir / "tokenizer.json", num_windows, length)
    inputs = teacher_forced_inputs(windows, manifest.block_size)[:1]
    num_blocks = num_windows * -(-length // manifest.block_size)
    feeds = calibration_feeds(inputs, num_blocks, manifest.block_size, cfg.num_kv_heads, cfg.head_dim, cfg.num_layers)
    if preset.smoothing_alpha:
        plan = smoothing_plan(model)
        groups = smooth(model, activation_ranges(model, list(plan), feeds, num_threads=0), plan,
                        preset.smoothing_alpha)
        print(f"[quantize] smoothed {len(groups)} activations (alpha {preset.smoothing_alpha}; largest channel "
              f"{max(g.max_ratio for g in groups):.0f}x its activation's median)")
    if not preset.float_share:
        return frozenset()
    head_width = cfg.vocab_size if preset.lm_head == "fp32" else None
    errors = block_int8_errors(model, weight_product_inputs(model, head_width), feeds, preset.block_size,
                               num_threads=0)
    worst = sorted(errors, key=errors.get, reverse=True)[:math.ceil(preset.float_share * len(errors))]
    kept = "float32 products" if preset.method == "q8_0" else "4-bit products with float activations"
    print(f"[quantize] {kept} for the {len(worst)} inputs with the largest int8 block error "
          f"({', '.join(f'{name} {errors[name]:.4f}' for name in worst)}); the next: "
          f"{(sorted(errors.values(), reverse=True) + [0.0])[len(worst)]:.4f}")
    return frozenset(worst)


def _quantize_blocks(model: onnx.ModelProto, target: Path, preset: QuantizationPreset, vocab_size: int,
                     keep_float: frozenset[str] = frozenset()) -> None:
    """llama.cpp's block formats (q4_1, q8_0) as MatMulNBits nodes (export.nbits)."""
    head_level = preset.accuracy_level if preset.method == "q8_0" else Q8_HEAD_ACCURACY_LEVEL
    # NOTE: the inputs losing most to int8 blocks keep float32 products under q8_0; under q4_1 they keep their
    # 4-bit weights with float activations (accuracy level 0: MatMulQ4's bfloat16 ones)
    float_products = keep_float if preset.method == "q8_0" else frozenset()
    plan = RewritePlan(block_size=preset.block_size, accuracy_level=preset.accuracy_level, head_format=preset.lm_head,
                       head_accuracy_level=head_level, vocab_size=vocab_size, body_format=preset.method,
                       keep_float=float_products, float_activations=keep_float - float_products,
                       head_block_size=preset.lm_head_block_size, head_rescore=preset.lm_head_rescore)
    rewrite_matmuls(model, plan)
    _save(model, target)


def _save(model: onnx.ModelProto, target: Path) -> None:
    large = model.ByteSize() > MAX_INLINE_BYTES
    onnx.save_model(model, str(target), save_as_external_data=large, all_tensors_to_one_file=True,
                    location=f"{target.name}.data" if large else None)


def recipe_for(preset: QuantizationPreset, num_quantized: int, source_graph: Path) -> QuantizationRecipe:
    """The typed recipe saved in the manifest."""
    return QuantizationRecipe(
        preset=preset.name, method=preset.method, weight_type=preset.weight_type, per_channel=preset.per_channel,
        block_size=preset.block_size, symmetric=preset.symmetric, accuracy_level=preset.accuracy_level,
        reduce_range=preset.reduce_range, op_types=("MatMul",), num_quantized=num_quantized,
        tool=_tool(preset), source_graph_sha256=sha256_file(source_graph),
    )


def _tool(preset: QuantizationPreset) -> str:
    tool = f"onnxruntime {metadata.version('onnxruntime')}"
    if preset.method in ("q4_1", "q8_0"):
        tool += f" MatMulNBits, graph rewritten by export.nbits (onnx {metadata.version('onnx')})"
    return tool


def quantize_export(options: QuantizeOptions) -> tuple[Manifest, VariantQuality]:
    """Quantize, copy the serving files, measure quality against the float32 export, gate; then publish."""
    preset = resolve_preset(options.method, options.block_size, options.accuracy_level, options.lm_head,
                            options.smoothing_alpha, options.float_share, options.lm_head_block_size,
                            options.lm_head_rescore)
    staging = options.out_dir.with_name(options.out_dir.name + ".tmp")
    manifest = write_quantized(options.export_dir, staging, preset)
    print(f"[quantize] {manifest.quantization.num_quantized} weight matrices quantized; "
          f"measuring quality against {options.export_dir}")
    report = evaluate(options.export_dir, {preset.method: staging}, options.evaluation,
                      {preset.method: options.gate} if options.gate else None)[0]
    report = dataclasses.replace(report, export_dir=str(options.out_dir))
    write_report([report], staging / REPORT_FILE, options.evaluation)
    if options.quality_gate:
        require_gate(report, staging)
    shutil.rmtree(options.out_dir, ignore_errors=True)
    staging.rename(options.out_dir)
    return manifest, report


def write_quantized(export_dir: Path, out_dir: Path, preset: QuantizationPreset) -> Manifest:
    """The quantized graph, the serving files and the manifest in out_dir (replaced), without quality checks."""
    source = Manifest.load(export_dir / MANIFEST_FILE)
    if source.quantization is not None:
        raise QuantizationError(f"{export_dir} is already quantized ({source.quantization.preset}); "
                                "quantize its float32 export instead")
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    graph = export_dir / source.model_file
    print(f"[quantize] {preset.name}: quantizing {graph}")
    count = quantize_graph(graph, out_dir / source.model_file, preset, source)
    for name in COPIED_FILES:
        if (export_dir / name).is_file():
            shutil.copy2(export_dir / name, out_dir / name)
    external = f"{source.model_file}.data" if (out_dir / f"{source.model_file}.data").is_file() else None
    manifest = dataclasses.replace(source, external_data=external, tools=tool_versions(), validation=(),
                                   quantization=recipe_for(preset, count, graph))
    manifest.save(out_dir / MANIFEST_FILE)
    return manifest

"""Quantize a float32 export folder with ONNX Runtime's tools (INT8 dynamic, 4-bit weight-only), gated on quality."""

from __future__ import annotations

import dataclasses
import importlib
import logging
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from export.onnx_export import COPIED_FILES, MAX_INLINE_BYTES, check_pool_reads
from export.quality import REPORT_FILE, EvalOptions, QualityGate, VariantQuality, evaluate, require_gate, write_report
from lepton.manifest import MANIFEST_FILE, Manifest, QuantizationRecipe, sha256_file, tool_versions
from lepton.runners.onnx_runner import INDEX_INPUTS

METHODS = ("int8", "int4")
QUANTIZED_OPS = {"int8": ("MatMulInteger",), "int4": ("MatMulNBits",)}


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


# NOTE: measured on this AVX2 CPU (no VNNI). int8: ORT's u8s8 kernel sums pairs of u8 x s8 products
# in saturating int16 (vpmaddubsw), so full-range int8 weights lost accuracy (KL 0.0049, top-1 0.90 on
# the trained demo); 7-bit weights (reduce_range) fixed it (KL 0.0006, top-1 0.97) and were the fastest
# int8 kernel (2.0-2.6x fp32 on a 576x1536 MatMul at 8 and 256 rows; u8u8: 1.5x). int4: accuracy
# level 4 (int8 compute) matched fp32 to 6.7x faster on large weights, while level 1 (fp32 compute)
# was slower than fp32 at decode batch sizes. Every non-MatMul op, the embedding and the K/V pools
# stay float32.
PRESETS = {
    "int8": QuantizationPreset("int8-dynamic-per-channel-7bit", "int8", "int8", True, None, True, None, True),
    "int4": QuantizationPreset("int4-block32-sym-acc4", "int4", "int4", False, 32, True, 4, False),
}


@dataclass(frozen=True)
class QuantizeOptions:
    """What `python -m export quantize` was asked to do."""

    export_dir: Path  # a float32 export folder (python -m export onnx)
    out_dir: Path
    method: str  # "int8" or "int4"
    block_size: int | None = None  # int4 block size override
    accuracy_level: int | None = None  # int4 accuracy level override
    gate: QualityGate | None = None  # None = the method's default gate (quality.GATES)
    quality_gate: bool = True  # False: report quality, never fail on it
    evaluation: EvalOptions = EvalOptions()


def resolve_preset(method: str, block_size: int | None, accuracy_level: int | None) -> QuantizationPreset:
    """The method's preset with CLI overrides applied and checked."""
    if method not in PRESETS:
        raise QuantizationError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    preset = PRESETS[method]
    if method == "int8" and (block_size is not None or accuracy_level is not None):
        raise QuantizationError("--block-size and --accuracy-level apply to int4 only (int8 is per channel)")
    if block_size is not None and (block_size < 16 or block_size & (block_size - 1)):
        raise QuantizationError(f"block size must be a power of two >= 16, got {block_size}")
    if accuracy_level is not None and accuracy_level not in (0, 1, 2, 3, 4):
        raise QuantizationError(f"accuracy level must be 0..4 (see MatMulNBits), got {accuracy_level}")
    return dataclasses.replace(
        preset,
        block_size=preset.block_size if block_size is None else block_size,
        accuracy_level=preset.accuracy_level if accuracy_level is None else accuracy_level,
    )


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
    _drop_unused_initializers(graph)
    return count


def _drop_unused_initializers(graph: onnx.GraphProto) -> None:
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    kept = [t for t in graph.initializer if t.name in used]
    graph.ClearField("initializer")
    graph.initializer.extend(kept)


def quantize_graph(source: Path, target: Path, preset: QuantizationPreset) -> int:
    """Write the quantized graph of source to target; returns the number of weight matrices quantized."""
    model = onnx.load(str(source))
    gemms_to_matmuls(model)
    with _quiet_root_logger():
        if preset.method == "int8":
            _quantize_int8(model, target, preset)
        else:
            _quantize_int4(model, target, preset)
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
    result = quantizer.model.model
    large = result.ByteSize() > MAX_INLINE_BYTES
    onnx.save_model(result, str(target), save_as_external_data=large, all_tensors_to_one_file=True,
                    location=f"{target.name}.data" if large else None)


def recipe_for(preset: QuantizationPreset, num_quantized: int, source_graph: Path) -> QuantizationRecipe:
    """The typed recipe saved in the manifest."""
    return QuantizationRecipe(
        preset=preset.name, method=preset.method, weight_type=preset.weight_type, per_channel=preset.per_channel,
        block_size=preset.block_size, symmetric=preset.symmetric, accuracy_level=preset.accuracy_level,
        reduce_range=preset.reduce_range, op_types=("MatMul",), num_quantized=num_quantized,
        tool=f"onnxruntime {metadata.version('onnxruntime')}", source_graph_sha256=sha256_file(source_graph),
    )


def quantize_export(options: QuantizeOptions) -> tuple[Manifest, VariantQuality]:
    """Quantize, copy the serving files, measure quality against the float32 export, gate; then publish."""
    preset = resolve_preset(options.method, options.block_size, options.accuracy_level)
    source = Manifest.load(options.export_dir / MANIFEST_FILE)
    if source.quantization is not None:
        raise QuantizationError(f"{options.export_dir} is already quantized ({source.quantization.preset}); "
                                "quantize its float32 export instead")
    staging = options.out_dir.with_name(options.out_dir.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    graph = options.export_dir / source.model_file
    print(f"[quantize] {preset.name}: quantizing {graph}")
    count = quantize_graph(graph, staging / source.model_file, preset)
    for name in COPIED_FILES:
        if (options.export_dir / name).is_file():
            shutil.copy2(options.export_dir / name, staging / name)
    external = f"{source.model_file}.data" if (staging / f"{source.model_file}.data").is_file() else None
    manifest = dataclasses.replace(source, external_data=external, tools=tool_versions(), validation=(),
                                   quantization=recipe_for(preset, count, graph))
    manifest.save(staging / MANIFEST_FILE)
    print(f"[quantize] {count} weight matrices quantized; measuring quality against {options.export_dir}")
    report = evaluate(options.export_dir, {preset.method: staging}, options.evaluation,
                      {preset.method: options.gate} if options.gate else None)[0]
    report = dataclasses.replace(report, export_dir=str(options.out_dir))
    write_report([report], staging / REPORT_FILE, options.evaluation)
    if options.quality_gate:
        require_gate(report, staging)
    shutil.rmtree(options.out_dir, ignore_errors=True)
    staging.rename(options.out_dir)
    return manifest, report

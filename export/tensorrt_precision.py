"""Typed step graphs for TensorRT: the fp32 graph's linear layers rewritten to fp16/bf16 or int8/fp8 Q/DQ."""

from __future__ import annotations

import functools
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from lepton.manifest import Manifest

PRECISIONS = ("fp32", "fp16", "bf16", "int8", "fp8")
CAST_TYPES = {"fp16": (TensorProto.FLOAT16, np.float16), "bf16": (TensorProto.BFLOAT16, ml_dtypes.bfloat16)}
QUANT_TYPES = {"int8": (np.int8, 127.0), "fp8": (ml_dtypes.float8_e4m3fn, 448.0)}
LINEAR_OPS = ("Gemm", "MatMul")
FP8_MIN_OPSET = 19  # QuantizeLinear / DequantizeLinear take float8 from opset 19 on
CALIBRATION_PROMPTS = 8
CALIBRATION_TOKENS = 128


@dataclass(frozen=True)
class Calibration:
    """How int8/fp8 activation scales were measured (ONNX Runtime on the CPU, fp32 graph)."""

    method: str  # "max": per-tensor absolute maximum; weights use per-output-channel maxima
    num_prompts: int
    num_tokens: int  # prompt tokens run, all prompts together
    num_activations: int  # activation tensors given a Q/DQ pair


@dataclass(frozen=True)
class TypedGraph:
    """The graph TensorRT parses, and what was done to it."""

    model: onnx.ModelProto | None  # None: the export's own graph file, unchanged (fp32)
    precision: str
    num_linear_layers: int  # linear layers (constant weight) rewritten; 0 for fp32
    calibration: Calibration | None


def linear_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """Gemm/MatMul nodes whose weight (input 1) is a float32 initializer: the model's linear layers."""
    weights = {t.name for t in graph.initializer if t.data_type == TensorProto.FLOAT}
    return [n for n in graph.node if n.op_type in LINEAR_OPS and len(n.input) > 1 and n.input[1] in weights]


def typed_graph(model: onnx.ModelProto, precision: str, manifest: Manifest, export_dir: Path) -> TypedGraph:
    """Rewrite model (in place) for precision; fp32 returns it unchanged."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    nodes = linear_nodes(model.graph)
    if precision == "fp32":
        return TypedGraph(model, precision, 0, None)
    if precision in CAST_TYPES:
        cast_linear_layers(model.graph, nodes, precision)
        return TypedGraph(model, precision, len(nodes), None)
    activations = list(dict.fromkeys(node.input[0] for node in nodes))
    amax, calibration = calibrate(model, activations, manifest, export_dir)
    quantize_linear_layers(model.graph, nodes, precision, amax)
    if precision == "fp8":
        _raise_opset(model, FP8_MIN_OPSET)
    return TypedGraph(model, precision, len(nodes), calibration)


def cast_linear_layers(graph: onnx.GraphProto, nodes: list[onnx.NodeProto], precision: str) -> None:
    """Compute each linear layer in fp16/bf16: weights stored so, inputs cast in, output cast back to fp32."""
    # NOTE: only the linear layers change type; norms, softmax, RoPE, residuals, the pools and all graph
    # inputs/outputs stay fp32, so the runner contract (fp32 logits and K/V) is the same for every precision.
    onnx_type, np_type = CAST_TYPES[precision]
    initializers = {t.name: t for t in graph.initializer}
    converted: dict[str, str] = {}
    new_nodes: list[onnx.NodeProto] = []
    targets = {n.output[0] for n in nodes}
    for node in graph.node:
        if node.output[0] not in targets:
            new_nodes.append(node)
            continue
        for index, name in enumerate(node.input):
            if not name or name in converted:
                node.input[index] = converted.get(name, name)
                continue
            typed = f"{name}.{precision}"
            if name in initializers:
                array = numpy_helper.to_array(initializers[name]).astype(np_type)
                graph.initializer.append(numpy_helper.from_array(array, typed))
            else:
                new_nodes.append(helper.make_node("Cast", [name], [typed], to=onnx_type, name=f"cast_{typed}"))
            converted[name] = node.input[index] = typed
        output = node.output[0]
        node.output[0] = f"{output}.{precision}"
        new_nodes += [node, helper.make_node("Cast", [node.output[0]], [output], to=TensorProto.FLOAT,
                                             name=f"cast_{output}")]
    _replace_nodes(graph, new_nodes)


def quantize_linear_layers(graph: onnx.GraphProto, nodes: list[onnx.NodeProto], precision: str,
                           amax: dict[str, float]) -> None:
    """Q/DQ each linear layer: per-tensor activation scales from amax, per-output-channel weight scales."""
    quant_type, qmax = QUANT_TYPES[precision]
    initializers = {t.name: t for t in graph.initializer}
    done: dict[str, str] = {}
    new_nodes: list[onnx.NodeProto] = []
    targets = {n.output[0] for n in nodes}
    for node in graph.node:
        if node.output[0] not in targets:
            new_nodes.append(node)
            continue
        activation, weight = node.input[0], node.input[1]
        if activation not in done:
            done[activation] = f"{activation}.dq"
            new_nodes += _activation_qdq(graph, activation, max(amax[activation], 1e-6) / qmax, quant_type)
        # NOTE: Gemm(transB=1) holds W as [out, in]; MatMul and Gemm(transB=0) as [in, out].
        transposed = node.op_type == "Gemm" and _attribute(node, "transB", 0) == 1
        axis = 0 if transposed else 1
        key = f"{weight}@{axis}"
        if key not in done:
            done[key] = f"{weight}.{precision}.dq"
            new_nodes.append(_weight_dq(graph, initializers[weight], axis, done[key], quant_type, qmax))
        node.input[0], node.input[1] = done[activation], done[key]
        new_nodes.append(node)
    _replace_nodes(graph, new_nodes)


def calibrate(model: onnx.ModelProto, activations: list[str], manifest: Manifest,
              export_dir: Path) -> tuple[dict[str, float], Calibration]:
    """Absolute maxima of the linear layers' inputs over prefill steps of local text, run with ONNX Runtime."""
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    probe.graph.output.extend(helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in activations)
    amax = dict.fromkeys(activations, 0.0)
    prompts = calibration_prompts(export_dir, manifest)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "calibrate.onnx"
        # NOTE: external data keeps graphs over protobuf's 2 GiB limit loadable.
        onnx.save_model(probe, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location="calibrate.onnx.data", size_threshold=1024)
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        for ids in prompts:
            for name, value in zip(activations, session.run(activations, prefill_feeds(ids, manifest))):
                amax[name] = max(amax[name], float(np.abs(value).max()))
    calibration = Calibration("max", len(prompts), sum(len(ids) for ids in prompts), len(activations))
    return amax, calibration


def calibration_prompts(export_dir: Path, manifest: Manifest) -> list[list[int]]:
    """Token ids of a few standard-library docstrings (local, deterministic), tokenized as served."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(export_dir / "tokenizer.json"))
    texts = _docstrings()
    picked = texts[:: max(1, len(texts) // CALIBRATION_PROMPTS)][:CALIBRATION_PROMPTS]
    limit = min(CALIBRATION_TOKENS, manifest.model_config.max_position_embeddings)
    return [ids for ids in (tokenizer.encode(text).ids[:limit] for text in picked) if ids]


def prefill_feeds(ids: list[int], manifest: Manifest) -> dict[str, np.ndarray]:
    """One sequence prefilling ids into empty pools: the step graph's feeds."""
    cfg, block_size = manifest.model_config, manifest.block_size
    n, num_blocks = len(ids), math.ceil(len(ids) / manifest.block_size)
    steps = np.arange(n, dtype=np.int64)
    feeds = {
        "input_ids": np.asarray(ids, np.int64), "positions": steps, "token_index": steps[None, :],
        "token_slot": steps, "query_lens": np.array([n], np.int64), "context_lens": np.array([n], np.int64),
        "block_tables": np.arange(num_blocks, dtype=np.int64)[None, :], "logits_indices": np.array([n - 1], np.int64),
    }
    pool = np.zeros((num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim), np.dtype(manifest.kv_dtype))
    feeds.update({spec.name: pool for spec in manifest.inputs if spec.name not in feeds})
    return feeds


@functools.cache
def _docstrings() -> list[str]:
    from export.corpus import stdlib_docstrings

    return stdlib_docstrings()


def _activation_qdq(graph: onnx.GraphProto, name: str, scale: float, quant_type) -> list[onnx.NodeProto]:
    graph.initializer.extend([numpy_helper.from_array(np.array(scale, np.float32), f"{name}.scale"),
                              numpy_helper.from_array(np.zeros((), quant_type), f"{name}.zero_point")])
    inputs = [f"{name}.scale", f"{name}.zero_point"]
    return [helper.make_node("QuantizeLinear", [name, *inputs], [f"{name}.q"], name=f"quantize_{name}"),
            helper.make_node("DequantizeLinear", [f"{name}.q", *inputs], [f"{name}.dq"], name=f"dequantize_{name}")]


def _weight_dq(graph: onnx.GraphProto, weight: onnx.TensorProto, axis: int, output: str, quant_type,
               qmax: float) -> onnx.NodeProto:
    array = numpy_helper.to_array(weight)
    scale = np.maximum(np.abs(array).max(axis=1 - axis), 1e-12).astype(np.float32) / np.float32(qmax)
    scaled = array / np.expand_dims(scale, 1 - axis)
    if quant_type is np.int8:
        scaled = np.clip(np.rint(scaled), -qmax, qmax)
    base = output.removesuffix(".dq")
    graph.initializer.extend([numpy_helper.from_array(scaled.astype(quant_type), f"{base}.q"),
                              numpy_helper.from_array(scale, f"{base}.scale")])
    return helper.make_node("DequantizeLinear", [f"{base}.q", f"{base}.scale"], [output], axis=axis,
                            name=f"dequantize_{base}")


def _replace_nodes(graph: onnx.GraphProto, nodes: list[onnx.NodeProto]) -> None:
    """Set graph.node to nodes and drop the initializers nothing reads any more (the fp32 weights)."""
    del graph.node[:]
    graph.node.extend(nodes)
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    unused = [t for t in graph.initializer if t.name not in used]
    for tensor in unused:
        graph.initializer.remove(tensor)


def _attribute(node: onnx.NodeProto, name: str, default: int) -> int:
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def _raise_opset(model: onnx.ModelProto, version: int) -> None:
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            opset.version = max(opset.version, version)

"""Activation smoothing (SmoothQuant) of a float32 step graph before its activations are quantized.

A weight product X @ W with per-channel scales s (one per row k of W) equals (X / s) @ (s * W). Where
X is the output of a per-channel multiply by a constant (an RMSNorm weight) or of an elementwise
product with another weight product (SwiGLU's up projection), the 1 / s folds into that constant or
those weight columns, so the graph computes the same function with no extra op. With
s_k = max|X_k|^alpha / max|W_k|^(1 - alpha) from calibration text, the activation's outlier channels
shrink and the weights take the difference; block-wise int8 activations (MatMulNBits at accuracy
level 4, as llama.cpp's Q8_0 x Q8_0 products) then lose less. Products whose input has no such
producer (attention's output into o_proj) are left as they are.

NOTE: folding o_proj's 1 / s into the V columns of qkv_proj was tried on SmolLM2 (alpha 0.5, head in
float32): KL 0.00218 -> 0.00216, and the K/V cache then holds scaled V, so float32 feeds recorded from
the reference no longer mean the same to the graph (max |logit err| 2.7 -> 10.3). Left out.
"""

from __future__ import annotations

import tempfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from export.validation import index_feeds
from lepton.runners.onnx_runner import make_session

MIN_SCALE = 1e-2  # NOTE: bounds s so a channel silent in calibration keeps usable weights
MAX_SCALE = 1e2


@dataclass(frozen=True)
class SmoothedGroup:
    """The weight products reading one activation, and where its 1 / s was folded."""

    activation: str
    weights: tuple[str, ...]  # initializer names, each [K, N], rows scaled by s
    folded_into: str  # the initializer divided by s (a [K] vector or K columns of a weight)
    max_ratio: float  # largest max|X_k| / median max|X_k| before smoothing (how uneven the channels were)


@dataclass(frozen=True)
class Fold:
    """Where an activation's 1 / s goes: a [K] vector, or columns start:stop of a [K', N] weight."""

    initializer: str
    how: str  # "vector" | "columns"
    start: int = 0
    stop: int = 0
    shared: bool = False  # a vector others read too (identical norm weights are one initializer): copied first


def smoothing_plan(model: onnx.ModelProto) -> dict[str, tuple[list[str], Fold]]:
    """activation -> (weight initializers of the products reading it, where its 1 / s folds).

    Only activations every consumer of which is a weight MatMul, whose producer is a Mul by a [K]
    constant (a norm weight; smooth() gives the Mul its own copy when others read it too), or a Mul
    with a weight product's output, or one part of its Split, read by nothing else (SwiGLU's up
    projection, fused with gate or not).
    """
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    consumers, producer = defaultdict(list), {}
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)
        for name in node.output:
            producer[name] = node
    outputs = {o.name for o in graph.output}
    plan = {}
    for activation, readers in consumers.items():
        if activation in inits or activation in outputs or activation not in producer:
            continue
        # NOTE: a Shape reader reads no values (the torchscript exporter adds some).
        readers = [n for n in readers if n.op_type != "Shape"]
        if not readers or not all(n.op_type == "MatMul" and n.input[0] == activation and n.input[1] in inits
                                  and len(inits[n.input[1]].dims) == 2 and len(consumers[n.input[1]]) == 1
                                  for n in readers):
            continue
        fold = _foldable(producer[activation], inits, consumers, producer, outputs)
        width = inits[readers[0].input[1]].dims[0]  # NOTE: K; a [1] constant (a scalar) cannot take s
        if fold is not None and (fold.how == "columns" or inits[fold.initializer].dims[0] == width) \
                and (fold.how == "vector" or fold.stop - fold.start == width):
            plan[activation] = ([n.input[1] for n in readers], fold)
    return plan


def _foldable(node, inits, consumers, producer, outputs) -> Fold | None:
    if node.op_type != "Mul":
        return None
    for operand in node.input:
        if operand in inits and len(inits[operand].dims) == 1:
            return Fold(operand, "vector", shared=len(consumers[operand]) > 1)
    for operand in node.input:
        if len(consumers[operand]) != 1 or operand in outputs or operand not in producer:
            continue
        split, source = None, producer[operand]
        if source.op_type == "Split" and len(consumers[source.input[0]]) == 1 and source.input[0] in producer:
            split, source = source, producer[source.input[0]]
        if source.op_type != "MatMul" or source.input[1] not in inits or len(consumers[source.input[1]]) != 1:
            continue
        width = inits[source.input[1]].dims[1]
        span = (0, width) if split is None else _split_span(split, operand, width, inits)
        if span is not None:
            return Fold(source.input[1], "columns", *span)
    return None


def _split_span(split, output: str, width: int, inits) -> tuple[int, int] | None:
    """Columns [start, stop) of a width-wide input that the split's output holds (a Split along the last axis)."""
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in split.attribute}
    if attrs.get("axis", 0) not in (-1, 1):
        return None
    if len(split.input) > 1 and split.input[1]:
        if split.input[1] not in inits:
            return None
        sizes = [int(v) for v in numpy_helper.to_array(inits[split.input[1]])]
    else:
        parts = attrs.get("num_outputs", len(split.output))
        if width % parts:
            return None
        sizes = [width // parts] * parts
    index = list(split.output).index(output)
    return sum(sizes[:index]), sum(sizes[:index + 1])


def activation_ranges(model: onnx.ModelProto, activations: list[str], feeds: list[dict[str, np.ndarray]],
                      num_threads: int) -> dict[str, np.ndarray]:
    """max |X_k| per channel of each activation over the calibration steps (the graph run with them as outputs)."""
    ranges: dict[str, np.ndarray] = {}
    for values in _probe_runs(model, activations, feeds, num_threads):
        for name, value in zip(activations, values):
            peak = np.abs(value.reshape(-1, value.shape[-1])).max(axis=0)
            ranges[name] = peak if name not in ranges else np.maximum(ranges[name], peak)
    return ranges


def _probe_runs(model: onnx.ModelProto, activations: list[str], feeds: list[dict[str, np.ndarray]],
                num_threads: int):
    """For each feed, the activations' values (the graph run with them as extra outputs)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    for name in activations:
        if name not in known:
            probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "probe.onnx"
        onnx.save_model(probe, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location="probe.onnx.data")
        session = make_session(path, num_threads)
        for feed in feeds:
            yield session.run(activations, feed)


def weight_product_inputs(model: onnx.ModelProto, skip_width: int | None = None) -> list[str]:
    """Activations read by MatMuls with a [K, N] weight initializer, in graph order; none read by a
    product of N = skip_width (an lm_head left in float32)."""
    inits = {t.name: t for t in model.graph.initializer}
    seen: dict[str, None] = {}
    for node in model.graph.node:
        weight = inits.get(node.input[1]) if node.op_type == "MatMul" else None
        if weight is not None and len(weight.dims) == 2 and node.input[0] not in inits \
                and weight.dims[1] != skip_width:
            seen[node.input[0]] = None
    return list(seen)


def block_int8_errors(model: onnx.ModelProto, activations: list[str], feeds: list[dict[str, np.ndarray]],
                      block_size: int, num_threads: int) -> dict[str, float]:
    """Relative error ||X - Q(X)|| / ||X|| of each activation under symmetric int8 blocks along its last axis
    (what MatMulNBits at accuracy level 4 does to its input)."""
    errors: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for feed_values in _probe_runs(model, activations, feeds, num_threads):
        for name, value in zip(activations, feed_values):
            rows = value.reshape(-1, value.shape[-1] // block_size, block_size).astype(np.float64)
            step = np.abs(rows).max(axis=-1, keepdims=True) / 127.0
            quantized = np.rint(rows / np.where(step > 0, step, 1.0)) * step
            errors[name][0] += float(((rows - quantized) ** 2).sum())
            errors[name][1] += float((rows ** 2).sum())
    return {name: (num / den) ** 0.5 if den else 0.0 for name, (num, den) in errors.items()}


def smooth(model: onnx.ModelProto, ranges: dict[str, np.ndarray], plan: dict[str, tuple[list[str], Fold]],
           alpha: float) -> list[SmoothedGroup]:
    """Fold s into the plan's weights (rows) and 1 / s into their producers, in place (the plan too, where a
    shared vector was copied); returns what was done."""
    inits = {t.name: t for t in model.graph.initializer}
    producer = {out: node for node in model.graph.node for out in node.output}
    arrays = {}
    for activation, (_, fold) in list(plan.items()):
        if fold.shared:
            # NOTE: the Mul producing this activation gets its own copy of the vector.
            copy = f"{fold.initializer}.smoothed.{activation}"
            model.graph.initializer.append(numpy_helper.from_array(numpy_helper.to_array(inits[fold.initializer]), copy))
            inits[copy] = model.graph.initializer[-1]
            mul = producer[activation]
            mul.input[list(mul.input).index(fold.initializer)] = copy
            plan[activation] = (plan[activation][0], Fold(copy, "vector"))

    def array(name: str) -> np.ndarray:
        if name not in arrays:
            arrays[name] = numpy_helper.to_array(inits[name]).astype(np.float32)
        return arrays[name]

    done = []
    for activation, (weights, fold) in plan.items():
        x_max = np.maximum(ranges[activation].astype(np.float64), 1e-6)
        w_max = np.max([np.abs(array(w)).max(axis=1) for w in weights], axis=0).astype(np.float64)
        scales = np.clip(x_max ** alpha / np.maximum(w_max, 1e-6) ** (1.0 - alpha), MIN_SCALE, MAX_SCALE)
        for w in weights:
            arrays[w] = (array(w) * scales[:, None]).astype(np.float32)
        target = array(fold.initializer).copy()
        if fold.how == "vector":
            target = target / scales
        else:
            target[:, fold.start:fold.stop] = target[:, fold.start:fold.stop] / scales[None, :]
        arrays[fold.initializer] = target.astype(np.float32)
        done.append(SmoothedGroup(activation, tuple(weights), fold.initializer, float(x_max.max() / np.median(x_max))))
    for name, value in arrays.items():
        inits[name].CopyFrom(numpy_helper.from_array(value, name))
    return done


def calibration_feeds(inputs, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                      num_layers: int) -> list[dict[str, np.ndarray]]:
    """Graph feeds of prefill steps (ModelInput) over empty K/V pools."""
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    pools = {f"{kind}_pool_{layer}": np.zeros(shape, np.float32) for layer in range(num_layers) for kind in "kv"}
    return [{**index_feeds(batch), **pools} for batch in inputs]

"""The RMS norm before Lepton's weight products, taken into them, in memory.

A Llama-family layer normalizes its residual stream x before the qkv product and before the MLP's gate/up
product, and the model's last norm comes before the lm_head: y = g x / sqrt(mean(x^2) + epsilon). The exports
write it as Pow(x, 2), ReduceMean over the last axis (keepdims), Add epsilon, Sqrt, Div(x, ...) and Mul by the
weight g, which ONNX Runtime fuses into a SimplifiedLayerNormalization node at load. Given g as their last
input and epsilon as an attribute, Lepton's MatMulQ4, MatMulQ8, MatMulBF16 and MatMulF32 normalize A's rows
themselves (lepton/native/ort.h, normalized_input) and the six nodes go: 61 nodes fewer a SmolLM2 step, a kernel
launch and a pass over the rows each. A norm whose output anything but Lepton's products reads (q8_0's and q4_1's
lm_head, whose top candidates a float32 product rescores from the same normalized rows) stays as exported.

The rewrite runs after the products' epilogues (epilogue_graph.py), so a product's optional residual is known:
the norm's weight goes after it, an empty name standing for a missing residual.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from lepton.native import DOMAIN as LEPTON_DOMAIN
from lepton.runners.epilogue_graph import PRODUCTS, _attrs, _readers
from lepton.runners.graph_edit import drop_nodes, drop_unused_initializers


def _producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {name: node for node in graph.node for name in node.output}


def _constant(name: str, initializers: dict) -> np.ndarray | None:
    tensor = initializers.get(name)
    return None if tensor is None else numpy_helper.to_array(tensor)


def _standard(node: onnx.NodeProto | None, op_type: str) -> bool:
    return node is not None and node.op_type == op_type and node.domain in ("", "ai.onnx")


def _last_axis(mean: onnx.NodeProto, initializers: dict) -> bool:
    """Whether the ReduceMean reduces exactly the last axis, written -1, and keeps it (axes as input, opset 18, or
    attribute)."""
    attrs = _attrs(mean)
    if attrs.get("keepdims", 1) != 1:
        return False
    axes = attrs.get("axes")
    if axes is None and len(mean.input) > 1 and mean.input[1]:
        axes = _constant(mean.input[1], initializers)
        axes = None if axes is None else axes.reshape(-1).tolist()
    return axes is not None and len(axes) == 1 and axes[0] == -1


def _norm_nodes(normed: str, producers: dict, readers: dict, initializers: dict, outputs: set,
                k: int) -> tuple[str, str, float, list[onnx.NodeProto]] | None:
    """(x, g, epsilon, [Pow, ReduceMean, Add, Sqrt, Div, Mul]) when `normed` is g x / sqrt(mean(x^2) + epsilon)
    over the last axis of K values, g an initializer [K], and nothing but the chain reads its inner values;
    else None."""
    mul = producers.get(normed)
    if not _standard(mul, "Mul") or len(mul.input) != 2:
        return None
    weights = [name for name in mul.input if name in initializers]
    if len(weights) != 1:
        return None
    g = _constant(weights[0], initializers)
    if g.dtype != np.float32 or g.shape != (k,):
        return None
    div = producers.get(next(name for name in mul.input if name != weights[0]))
    if not _standard(div, "Div"):
        return None
    x, root = div.input
    sqrt = producers.get(root)
    add = producers.get(sqrt.input[0]) if _standard(sqrt, "Sqrt") else None
    if not _standard(add, "Add"):
        return None
    eps = [name for name in add.input if name in initializers]
    epsilon = _constant(eps[0], initializers) if len(eps) == 1 else None
    if epsilon is None or epsilon.size != 1 or not float(epsilon.reshape(-1)[0]) > 0:
        return None
    mean = producers.get(next(name for name in add.input if name != eps[0]))
    if not _standard(mean, "ReduceMean") or not _last_axis(mean, initializers):
        return None
    power = producers.get(mean.input[0])
    exponent = _constant(power.input[1], initializers) if _standard(power, "Pow") else None
    if exponent is None or exponent.size != 1 or float(exponent.reshape(-1)[0]) != 2.0 or power.input[0] != x:
        return None
    chain = [power, mean, add, sqrt, div, mul]
    for inner, reader in zip(chain[:-1], chain[1:]):
        if inner.output[0] in outputs or [id(r) for r in readers.get(inner.output[0], [])] != [id(reader)]:
            return None
    return x, weights[0], float(epsilon.reshape(-1)[0]), chain


def norm_graph(model: onnx.ModelProto) -> int:
    """Every RMS norm that only Lepton's weight products read taken into them (A := the norm's input x, the
    norm's weight as their last input, attribute epsilon), its six nodes removed, in place; returns how many
    norms."""
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    readers = _readers(graph)
    producers = _producers(graph)
    outputs = {o.name for o in graph.output}
    gone: set[int] = set()
    count = 0
    for normed in dict.fromkeys(node.input[0] for node in graph.node if node.domain == LEPTON_DOMAIN
                                and node.op_type in PRODUCTS):
        products = readers.get(normed, [])
        if normed in outputs or not all(
                p.domain == LEPTON_DOMAIN and p.op_type in PRODUCTS and p.input[0] == normed
                and normed not in p.input[1:] and len(p.input) <= PRODUCTS[p.op_type] + 1
                and "epsilon" not in _attrs(p) for p in products):
            continue
        found = _norm_nodes(normed, producers, readers, initializers, outputs, _attrs(products[0])["K"])
        if found is None or any(_attrs(p)["K"] != _attrs(products[0])["K"] for p in products):
            continue
        x, weight, epsilon, chain = found
        for product in products:
            product.input[0] = x
            while len(product.input) < PRODUCTS[product.op_type] + 1:
                product.input.append("")  # NOTE: no residual
            product.input.append(weight)
            product.attribute.append(helper.make_attribute("epsilon", epsilon))
        gone.update(id(node) for node in chain)
        count += 1
    if count:
        drop_nodes(graph, gone)
        drop_unused_initializers(graph)  # NOTE: the exponent, epsilon and axes, unless other nodes read them
    return count

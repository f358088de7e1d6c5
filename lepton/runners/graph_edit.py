"""Edits of an ONNX graph shared by the exporter's quantizers (export/nbits.py), the slot rewrite and the
runners' rewrites to Lepton's operators (q8_graph, q4_graph, bf16_graph, f32_graph, epilogue_graph, norm_graph)."""

from __future__ import annotations

from typing import Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from lepton.native import DOMAIN as LEPTON_DOMAIN

MS_DOMAIN = "com.microsoft"


def replace_nodes(model: onnx.ModelProto, nodes: list[onnx.NodeProto], initializers: list[onnx.TensorProto]) -> None:
    """The graph's nodes become `nodes` (in this order), `initializers` are added, unused ones dropped,
    and the com.microsoft opset is imported (MatMulNBits, GroupQueryAttention)."""
    graph = model.graph
    graph.ClearField("node")
    graph.node.extend(nodes)
    graph.initializer.extend(initializers)
    drop_unused_initializers(graph)
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))


def drop_unused_initializers(graph: onnx.GraphProto) -> None:
    """Remove initializers no node or output reads."""
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    # NOTE: deleted where they are: clearing the field and adding the kept ones back copied every kept
    # weight once more into the message's memory, which protobuf frees only with the whole message
    for index in reversed(range(len(graph.initializer))):
        if graph.initializer[index].name not in used:
            del graph.initializer[index]


def drop_dead_nodes(graph: onnx.GraphProto) -> None:
    """Remove nodes none of whose outputs a graph output or a kept node reads."""
    needed = {o.name for o in graph.output}
    kept = []
    for node in reversed(graph.node):
        if any(out in needed for out in node.output):
            kept.append(node)
            needed.update(node.input)
    graph.ClearField("node")
    graph.node.extend(reversed(kept))


def drop_nodes(graph: onnx.GraphProto, gone: set[int]) -> None:
    """Remove the nodes whose id() is in `gone`, the others kept in their order."""
    nodes = [node for node in graph.node if id(node) not in gone]
    graph.ClearField("node")
    graph.node.extend(nodes)


def add_rewritten(model: onnx.ModelProto, initializers: list[onnx.TensorProto], domain: str) -> None:
    """After nodes were rewritten in place to `domain`'s operators: their new initializers added, the
    ones no node reads any more dropped, and `domain` imported."""
    model.graph.initializer.extend(initializers)
    drop_unused_initializers(model.graph)
    if not any(o.domain == domain for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(domain, 1))


def float_weight(node: onnx.NodeProto, initializers: dict[str, onnx.TensorProto]) -> np.ndarray | None:
    """The [N, K] float32 weight of a product of an activation with a float32 weight initializer (`Gemm` with
    transB=1 and alpha=1, a bias with beta 1 then added, as the exporter writes it; `MatMul` with a 2-D weight),
    else None."""
    if node.domain not in ("", "ai.onnx") or len(node.input) < 2 or node.input[1] not in initializers:
        return None
    tensor = initializers[node.input[1]]
    if tensor.data_type != onnx.TensorProto.FLOAT or len(tensor.dims) != 2:
        return None
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "Gemm":
        if attrs.get("transA", 0) or attrs.get("transB", 0) != 1 or attrs.get("alpha", 1.0) != 1.0:
            return None
        if len(node.input) > 2 and node.input[2] and attrs.get("beta", 1.0) != 1.0:
            return None
        return numpy_helper.to_array(tensor)  # [N, K]
    if node.op_type == "MatMul":
        return numpy_helper.to_array(tensor).T  # [K, N] -> [N, K]
    return None


def rewrite_float_products(model: onnx.ModelProto, op_type: str, suffix: str, pack: Callable[[np.ndarray], np.ndarray],
                           weight_of: Callable[[onnx.NodeProto, dict], np.ndarray | None]) -> int:
    """Rewrite every product whose weight `weight_of` gives ([N, K] float32) to Lepton's `op_type` (inputs A and the
    packed weights, attributes K and N), in place; returns how many. Each weight is packed once (`pack`, named
    `<weight>.<suffix>`); a weight other nodes also read (a tied embedding's table) stays for them as it was; a
    Gemm's bias becomes an Add right after the product."""
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    packed: dict[str, str] = {}  # NOTE: a weight two products share is packed once
    added, biased, count = [], [], 0
    for node in graph.node:
        weight = weight_of(node, initializers)
        if weight is None:
            continue
        name = packed.get(node.input[1])
        if name is None:
            name = packed[node.input[1]] = f"{node.input[1]}.{suffix}"
            added.append(numpy_helper.from_array(pack(weight), name))
        bias = node.input[2] if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2] else None
        product = f"{node.output[0]}.{suffix}_product" if bias else node.output[0]
        replacement = helper.make_node(op_type, [node.input[0], name], [product], name=node.name,
                                       domain=LEPTON_DOMAIN, K=int(weight.shape[1]), N=int(weight.shape[0]))
        if bias:  # NOTE: Gemm's C (beta 1), broadcast over the rows as Gemm does
            biased.append((product, helper.make_node("Add", [product, bias], [node.output[0]],
                                                     name=f"{node.name or node.output[0]}.bias")))
        node.CopyFrom(replacement)
        count += 1
    for product, add in biased:  # NOTE: each Add right after its product keeps the graph in topological order
        at = next(i for i, n in enumerate(graph.node) if product in n.output)
        graph.node.insert(at + 1, add)
    if count:
        add_rewritten(model, added, LEPTON_DOMAIN)
    return count


# NOTE: the weight products, whatever their domain (ONNX, com.microsoft, Lepton's): input 0 is the activation
PRODUCTS = frozenset({"MatMul", "Gemm", "MatMulNBits", "MatMulInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul",
                      "MatMulQ8", "MatMulQ4", "MatMulF32", "MatMulBF16"})
FOUR_BIT = frozenset({onnx.TensorProto.INT4, onnx.TensorProto.UINT4})  # NOTE: two to a byte


def product_weight_bytes(graph: onnx.GraphProto, then_branch: bool) -> int:
    """Bytes of the weights one decode step's products read: each initializer a product takes beside its
    activation, counted once, in the graph and in the branch of each If that runs (then_branch: the then branch,
    else the else branch). What Gathers read (a token's embedding row, a rescore's candidate rows), norm
    weights and rope tables are not counted: a few hundred kB a step. Sizes come from the initializers' dims,
    so a graph loaded without its external data counts as well."""
    counted: set[str] = set()
    return _product_bytes(graph, {t.name: t for t in graph.initializer}, then_branch, counted)


def _product_bytes(graph: onnx.GraphProto, initializers: dict[str, onnx.TensorProto], then_branch: bool,
                   counted: set[str]) -> int:
    total = 0
    for node in graph.node:
        if node.op_type == "If":
            branch = next(a.g for a in node.attribute if a.name == ("then_branch" if then_branch else "else_branch"))
            inner = initializers | {t.name: t for t in branch.initializer}
            total += _product_bytes(branch, inner, then_branch, counted)
        elif node.op_type in PRODUCTS:
            for name in node.input[1:]:
                tensor = initializers.get(name)
                if tensor is not None and name not in counted:
                    counted.add(name)
                    count = int(np.prod(tensor.dims, dtype=np.int64))
                    total += (count + 1) // 2 if tensor.data_type in FOUR_BIT else \
                        count * helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    return total

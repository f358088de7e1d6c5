"""Edits of an ONNX graph shared by the exporter's quantizers (export/nbits.py), the slot rewrite and the
runners' rewrites to Lepton's operators (q8_graph, q4_graph, bf16_graph, epilogue_graph, norm_graph)."""

from __future__ import annotations

import onnx
from onnx import helper

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
    kept = [t for t in graph.initializer if t.name in used]
    graph.ClearField("initializer")
    graph.initializer.extend(kept)


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

"""A rescored lm_head's candidates recomputed in one node, in memory.

A quantized head of a q8_0 or q4_1 export (export/nbits.py `rescore_nodes`) keeps its logits' tail and recomputes
each row's top candidates in float32 from the tied embedding's rows: TopK over the approximate logits, Gather
of the candidates' rows, the hidden row (times smoothing's column scale: Mul) Unsqueezed, a batched MatMul,
Squeeze, and ScatterElements of the exact values over the approximate ones. Lepton's TopKRescore
(lepton/native/rescore.c) computes the same in one node and one task a row: 16 rows of SmolLM2's head took 0.735 ms
in those nodes, 0.382 in it (docs/performance.md). The values it writes are the same dot products summed in another
order (float32 rounding apart). The rewrite runs with Lepton's product rewrites (their library registers it).
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx
from onnx import helper, numpy_helper

from lepton.native import DOMAIN as LEPTON_DOMAIN
from lepton.runners.graph_edit import drop_unused_initializers


@dataclass(frozen=True)
class Chain:
    """An export's rescore chain: its nodes, and what TopKRescore reads instead."""

    nodes: tuple[onnx.NodeProto, ...]
    approx: str  # the approximate logits [L, N]
    hidden: str  # the rows the head multiplied [L, K] (before the column scale)
    table: str  # float32 [N, K]: the candidates' rows
    scale: str | None  # per K column, or None
    k: int  # candidates a row
    output: str


def find_chain(scatter: onnx.NodeProto, producers: dict, initializers: dict) -> Chain | None:
    """The chain ending in `scatter` (named `<prefix>.rescore.scatter` by the exporter), or None."""
    if scatter.op_type != "ScatterElements" or not scatter.name.endswith(".rescore.scatter"):
        return None
    approx, ids, exact = scatter.input
    topk, squeeze = producers.get(ids), producers.get(exact)
    matmul = producers.get(squeeze.input[0]) if squeeze is not None and squeeze.op_type == "Squeeze" else None
    if topk is None or topk.op_type != "TopK" or topk.input[0] != approx or matmul is None or matmul.op_type != "MatMul":
        return None
    gather, column = producers.get(matmul.input[0]), producers.get(matmul.input[1])
    if (gather is None or gather.op_type != "Gather" or column is None or column.op_type != "Unsqueeze"
            or gather.input[1] != topk.output[1] or topk.input[1] not in initializers):
        return None
    scaled = producers.get(column.input[0])
    if scaled is not None and scaled.op_type == "Mul" and scaled.name.endswith(".rescore.scaled"):
        hidden, scale = scaled.input
    else:
        hidden, scale, scaled = column.input[0], None, None
    k = int(numpy_helper.to_array(initializers[topk.input[1]]).reshape(-1)[0])
    nodes = tuple(n for n in (scaled, topk, gather, column, matmul, squeeze, scatter) if n is not None)
    return Chain(nodes, approx, hidden, gather.input[0], scale, k, scatter.output[0])


def rescore_graph(model: onnx.ModelProto) -> int:
    """Each rescore chain of the graph replaced, in place, by one TopKRescore node; returns how many."""
    graph = model.graph
    producers = {out: node for node in graph.node for out in node.output}
    initializers = {t.name: t for t in graph.initializer}
    chains = [c for node in graph.node if (c := find_chain(node, producers, initializers)) is not None]
    if not chains:
        return 0
    inside = {id(node) for chain in chains for node in chain.nodes}
    internal = {out for chain in chains for node in chain.nodes for out in node.output} - {c.output for c in chains}
    readers = [name for node in graph.node if id(node) not in inside for name in node.input]
    if any(name in internal for name in readers + [o.name for o in graph.output]):
        return 0  # NOTE: something else reads a value of a chain: it stays as exported
    replacement = {id(chain.nodes[-1]): helper.make_node(
        "TopKRescore", [chain.approx, chain.hidden, chain.table, chain.scale or ""], [chain.output],
        name=chain.nodes[-1].name.removesuffix(".scatter"), domain=LEPTON_DOMAIN, k=chain.k, bfloat16=0)
        for chain in chains}
    nodes = [replacement.get(id(node), node) for node in graph.node if id(node) not in inside or id(node) in replacement]
    graph.ClearField("node")
    graph.node.extend(nodes)
    drop_unused_initializers(graph)
    return len(chains)

"""What Lepton's weight products compute after their sums, taken from the nodes after them, in memory.

Two epilogues, each a pass over the product's output that ONNX Runtime otherwise runs as nodes of their own:

- The MLP's gate (gated = 1). A Llama-family MLP computes silu(x Wg^T) x (x Wu^T); the exports fuse the two
  weights into one product of 2 I outputs, Split it in halves, then Sigmoid and Mul the first half (silu) and
  Mul that with the second. Lepton's MatMulQ4, MatMulQ8, MatMulBF16 and MatMulF32 with gated = 1 compute silu(gate) x up
  in the product's own tasks (lepton/native/ort.h, PRODUCT_TASK): their weights' panels of 16 outputs
  interleaved, gate panel j then up panel j, and Y [..., I]. The Split, the Sigmoid and the two Muls go.
- The residual add (an optional last input R). After attention's o_proj and the MLP's down_proj the exports
  Add the product to the residual stream; with R given the product stores R + A W^T (the same float32 sum
  the Add makes, bit for bit) and the Add goes.

A 16-decode step of SmolLM2 q4_1 spent ~1.6 ms of 22 in those nodes, a 128-token prompt ~5 of 84
(docs/performance.md). The rewrite runs after the weight products became Lepton's (q8_graph, q4_graph,
bf16_graph, f32_graph).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from lepton.native import DOMAIN as LEPTON_DOMAIN
from lepton.runners.graph_edit import add_rewritten, drop_nodes

# NOTE: each product's inputs without the optional residual, the last one
PRODUCTS = {"MatMulQ4": 4, "MatMulQ8": 3, "MatMulBF16": 2, "MatMulF32": 2}
GATE_PAIR = 32  # NOTE: a panel is 16 outputs; a gated product's N is a multiple of 2 panels


def interleave(panels: np.ndarray) -> np.ndarray:
    """A product's per-panel array [P, ...] (gate panels 0 .. P / 2 - 1, then up panels) -> gate panel j at
    2 j and up panel j at 2 j + 1."""
    half = panels.shape[0] // 2
    return np.ascontiguousarray(np.stack([panels[:half], panels[half:]], axis=1).reshape(panels.shape))


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _readers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    """Each value's reading nodes, in graph order."""
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    return readers


def _product(node: onnx.NodeProto) -> bool:
    """A Lepton weight product without an epilogue yet (neither gated nor given a residual)."""
    return (node.domain == LEPTON_DOMAIN and node.op_type in PRODUCTS and not _attrs(node).get("gated", 0)
            and len(node.input) == PRODUCTS[node.op_type])


def _halves(split: onnx.NodeProto, n: int, rank: int | None, initializers: dict) -> bool:
    """Whether `split` cuts its input's last axis into two halves of n / 2."""
    if split.op_type != "Split" or split.domain not in ("", "ai.onnx") or len(split.output) != 2:
        return False
    axis = _attrs(split).get("axis", 0)
    if not (axis == -1 or (rank is not None and axis == rank - 1)):
        return False
    if len(split.input) > 1 and split.input[1]:  # NOTE: sizes given; else num_outputs 2 cuts in equal halves
        sizes = initializers.get(split.input[1])
        return sizes is not None and numpy_helper.to_array(sizes).tolist() == [n // 2, n // 2]
    return True


def _shapes(graph: onnx.GraphProto) -> dict[str, list]:
    """Each value's declared shape (each dimension its value or its name; the first declaration of a name)."""
    shapes: dict[str, list] = {}
    for info in [*graph.value_info, *graph.input, *graph.output]:
        if info.type.tensor_type.HasField("shape"):
            shapes.setdefault(info.name, [d.dim_param or d.dim_value or None for d in info.type.tensor_type.shape.dim])
    return shapes


def _gate_nodes(product: onnx.NodeProto, readers: dict, outputs: set, initializers: dict,
                shapes: dict[str, list]) -> list[onnx.NodeProto] | None:
    """[Split, Sigmoid, Mul (silu), Mul (silu x up)] after `product` when they compute silu(gate) x up of its
    halves and nothing else reads what they make on the way; else None."""
    n = _attrs(product)["N"]
    y = product.output[0]
    if n % GATE_PAIR or y in outputs or len(readers.get(y, [])) != 1:
        return None
    split = readers[y][0]
    shape = shapes.get(y) or shapes.get(product.input[0])
    if not _halves(split, n, None if shape is None else len(shape), initializers):
        return None
    gate, up = split.output
    sigmoids = [r for r in readers.get(gate, []) if r.op_type == "Sigmoid"]
    silus = [r for r in readers.get(gate, []) if r.op_type == "Mul"]
    if len(readers.get(gate, [])) != 2 or len(sigmoids) != 1 or len(silus) != 1:
        return None
    sigmoid, silu = sigmoids[0], silus[0]
    if sorted(silu.input) != sorted([gate, sigmoid.output[0]]) or readers.get(sigmoid.output[0]) != [silu]:
        return None
    gates = readers.get(silu.output[0], [])
    if len(gates) != 1 or gates[0].op_type != "Mul" or sorted(gates[0].input) != sorted([silu.output[0], up]):
        return None
    if readers.get(up) != gates or {gate, up, sigmoid.output[0], silu.output[0]} & outputs:
        return None
    return [split, sigmoid, silu, gates[0]]


def gated_graph(model: onnx.ModelProto) -> int:
    """Every Lepton weight product whose output only an MLP's gate reads (Split in halves, Sigmoid, Mul, Mul)
    made gated = 1 with its panels interleaved, in place; returns how many."""
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    readers = _readers(graph)
    outputs = {o.name for o in graph.output}
    shapes = _shapes(graph)
    gone, added, count = set(), [], 0
    for node in graph.node:
        if not _product(node) or not all(name in initializers for name in node.input[1:]):
            continue
        gate = _gate_nodes(node, readers, outputs, initializers, shapes)
        if gate is None:
            continue
        names = [f"{name}.gated" for name in node.input[1:]]
        added += [numpy_helper.from_array(interleave(numpy_helper.to_array(initializers[name])), new)
                  for name, new in zip(node.input[1:], names)]
        del node.input[1:]
        node.input.extend(names)
        node.output[0] = gate[-1].output[0]
        node.attribute.append(helper.make_attribute("gated", 1))
        gone.update(id(g) for g in gate)
        count += 1
    if count:
        drop_nodes(graph, gone)
        add_rewritten(model, added, LEPTON_DOMAIN)
    return count


def residual_graph(model: onnx.ModelProto) -> int:
    """Every Lepton weight product (not gated) whose output only an Add reads, the Add's other input R of the
    same declared shape (no broadcast), given R as its residual input and the Add's output, in the Add's
    place, in place; returns how many."""
    graph = model.graph
    readers = _readers(graph)
    outputs = {o.name for o in graph.output}
    shapes = _shapes(graph)
    fused: dict[int, onnx.NodeProto] = {}  # NOTE: id of each Add -> its product, which takes the Add's place
    gone = set()
    for node in graph.node:
        if not _product(node):
            continue
        y = node.output[0]
        adds = readers.get(y, [])
        if y in outputs or len(adds) != 1 or adds[0].op_type != "Add" or adds[0].domain not in ("", "ai.onnx"):
            continue
        add = adds[0]
        others = [name for name in add.input if name != y]
        if len(add.input) != 2 or len(others) != 1:
            continue
        shape = shapes.get(y)
        if shape is None or None in shape or shapes.get(others[0]) != shape:
            continue
        node.input.append(others[0])
        node.output[0] = add.output[0]
        fused[id(add)] = node
        gone.add(id(node))
    if fused:
        nodes = [fused.get(id(node), node) for node in graph.node if id(node) not in gone]
        graph.ClearField("node")
        graph.node.extend(nodes)
    return len(fused)


def epilogue_graph(model: onnx.ModelProto) -> tuple[int, int]:
    """gated_graph, then residual_graph: (gated products, products given their residual)."""
    return gated_graph(model), residual_graph(model)

"""A 4-bit draft of the lm_head for the steps whose sampler reads only each row's argmax, in memory.

A greedy row without logprobs, penalties or a min_tokens ban reads one thing of its logits: the argmax. Any
cheaper head can pick a few candidates among which it lies, and the head's own arithmetic rescores them. Here
the slot graph's head becomes an `If` on a boolean graph input, `argmax_only`:

- false: the head as it was (its nodes moved into the else branch unchanged: the same logits bit for bit);
- true: Lepton's MatMulQ4 with int8 activations over a q4_1 copy of the head's weight (blocks of 32, d and
  m in float16: 0.625 bytes a weight; SmolLM2's head 17.7 MB a token, against 30.1 in 8 bits, 56.6 in
  bfloat16, 113.2 in float32) takes the top candidates, whose logits are recomputed from the float32 rows of
  the tied embedding as the head computes them, and written over the draft's.

Two heads are drafted. A q8_0 or q4_1 export's rescored 8-bit head (export/nbits.py `rescore_nodes`; MatMulQ8
once q8_graph ran) already recomputes its top candidates in float32 from those rows: the draft takes as many and
rescores them with the same kind of nodes over the same rows (smoothing's column scale included). A float32 export's head of Lepton's MatMulF32, or MatMulBF16 (weight_dtype=
bfloat16), whose weight is the tied embedding's table (still in the graph for the embedding's Gather), and
whose final RMS norm it took in (norm_graph.py): the draft normalizes the same way, takes DRAFT_CANDIDATES,
and rescores them in float32 from the table, rounded to bfloat16 first (rows and activations, nearest even,
as MatMulBF16 rounds them) for a bfloat16 head, so that both paths give the same argmax up to float32's order
of summation.

The argmax of the two agrees wherever the true best is among the draft's candidates: on SmolLM2-135M-Instruct's
held-out text, 8,192 positions of 8,192 with 16, 32 or 64 candidates of a 4-bit head (docs/performance.md,
"A draft of the lm_head for greedy steps"). The runner binds `argmax_only` per run (ModelInput.argmax_only,
lepton/batch.py); RunnerConfig.draft_head turns it off.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from lepton.native import DOMAIN as LEPTON_DOMAIN
from lepton.runners.q4_graph import BLOCK, pack

FLAG = "argmax_only"  # the graph input: bool scalar
FLOAT_HEADS = ("MatMulF32", "MatMulBF16")
DRAFT_CANDIDATES = 64  # a float head's candidates (the q8_0 and q4_1 presets rescore 64 too)
QUANTIZE_ROWS = 4096  # rows of the head quantized at a time (float32 temporaries of ~10 MB, not ~1 GB)


def q4_1(weight_nk: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[N, K] float32 -> codes [N, K / 32, 32] uint8 (0..15), scales d and minimums m [N, K / 32] float32 with
    w ~ d q + m per block of 32 (llama.cpp's Q4_1: d = (max - min) / 15, m = min), d and m rounded to float16
    first (what MatMulQ4 keeps) and the codes rounded against them."""
    n, k = weight_nk.shape
    codes = np.empty((n, k // BLOCK, BLOCK), np.uint8)
    scales = np.empty((n, k // BLOCK), np.float32)
    mins = np.empty((n, k // BLOCK), np.float32)
    for first in range(0, n, QUANTIZE_ROWS):
        blocks = np.asarray(weight_nk[first:first + QUANTIZE_ROWS], np.float32).reshape(-1, k // BLOCK, BLOCK)
        low = blocks.min(axis=-1).astype(np.float16).astype(np.float32)
        step = ((blocks.max(axis=-1) - low) / 15).astype(np.float16).astype(np.float32)
        safe = np.where(step > 0, step, 1)
        codes[first:first + QUANTIZE_ROWS] = np.clip(np.rint((blocks - low[..., None]) / safe[..., None]), 0, 15)
        scales[first:first + QUANTIZE_ROWS], mins[first:first + QUANTIZE_ROWS] = step, low
    return codes, scales, mins


@dataclass
class _Head:
    """A head the draft can stand in for: its nodes (moved into the else branch) and what the draft reads."""

    nodes: list[onnx.NodeProto]
    activation: str  # the product's A: normalized rows, or (norm) the rows before the final norm
    table: str  # float32 [N, K]: the candidates' rows
    k: str | None  # int64 [1] initializer: how many candidates (None: DRAFT_CANDIDATES)
    axis: str | None  # int64 [1] initializer holding -1 (None: made here)
    scale: str | None = None  # per K column: the head's weight is table * scale (a smoothed 8-bit head)
    norm: tuple[str, float] | None = None  # the final RMS norm's weight and epsilon, taken into the product
    bfloat16: bool = False  # the head computes in bfloat16 (rows and activations rounded): so does the rescore


def _rescored_head(producers: dict) -> _Head | None:
    """The rescored 8-bit head whose ScatterElements writes the graph output `logits`, or None."""
    scatter = producers.get("logits")
    if scatter is None or scatter.op_type != "ScatterElements" or not scatter.name.endswith(".rescore.scatter"):
        return None
    approx, ids, exact = scatter.input
    product, topk = producers.get(approx), producers.get(ids)
    squeeze = producers.get(exact)
    matmul = producers.get(squeeze.input[0]) if squeeze is not None and squeeze.op_type == "Squeeze" else None
    if (product is None or product.op_type != "MatMulQ8" or product.domain != LEPTON_DOMAIN or topk is None
            or topk.op_type != "TopK" or topk.input[0] != approx or matmul is None or matmul.op_type != "MatMul"):
        return None
    gather, column = producers.get(matmul.input[0]), producers.get(matmul.input[1])
    if gather is None or gather.op_type != "Gather" or column is None or column.op_type != "Unsqueeze":
        return None
    hidden, scale, scaled = product.input[0], None, producers.get(column.input[0])
    if scaled is not None and scaled.op_type == "Mul" and scaled.input[0] == hidden:
        scale = scaled.input[1]
    elif column.input[0] == hidden:
        scaled = None
    else:
        return None
    nodes = [n for n in (product, scaled, topk, gather, column, matmul, squeeze, scatter) if n is not None]
    return _Head(nodes, hidden, gather.input[0], topk.input[1], column.input[1], scale=scale)


def _float_head(producers: dict, initializers: dict) -> _Head | None:
    """The MatMulF32 or MatMulBF16 head writing the graph output `logits` whose weight is a float32 table still in
    the graph (a tied embedding's), or None (an untied head keeps only its packed weight: nothing to rescore from)."""
    product = producers.get("logits")
    if product is None or product.op_type not in FLOAT_HEADS or product.domain != LEPTON_DOMAIN:
        return None
    attrs = {a.name: helper.get_attribute_value(a) for a in product.attribute}
    table = product.input[1].rsplit(".", 1)[0]  # NOTE: graph_edit.rewrite_float_products names it <weight>.<suffix>
    tensor = initializers.get(table)
    if (tensor is None or tensor.data_type != TensorProto.FLOAT or tuple(tensor.dims) != (attrs.get("N"), attrs.get("K"))
            or attrs.get("gated", 0) or (len(product.input) > 2 and product.input[2])):
        return None
    norm = (product.input[3], float(attrs.get("epsilon", 1e-5))) if len(product.input) > 3 and product.input[3] else None
    return _Head([product], product.input[0], table, None, None, norm=norm,
                 bfloat16=product.op_type == "MatMulBF16")


def draft_head_graph(model: onnx.ModelProto) -> int:
    """Rewrite a slot graph's head into the If of the module docstring, in place (after Lepton's product rewrites);
    returns the draft's weight bytes, 0 when the graph has no head the draft knows (left as it was)."""
    graph = model.graph
    producers = {out: node for node in graph.node for out in node.output}
    initializers = {t.name: t for t in graph.initializer}
    head = _rescored_head(producers) or _float_head(producers, initializers)
    if head is None or head.table not in initializers or (head.scale is not None and head.scale not in initializers):
        return 0
    inside = {out for node in head.nodes for out in node.output} - {"logits"}
    moved = {id(node) for node in head.nodes}
    if any(name in inside for node in graph.node if id(node) not in moved for name in node.input):
        return 0  # NOTE: something outside the head reads one of its values: it cannot move into a branch
    table = numpy_helper.to_array(initializers[head.table])
    weight = table if head.scale is None else table * numpy_helper.to_array(initializers[head.scale])
    n, k = weight.shape
    if k % BLOCK:
        return 0
    arrays = pack(*q4_1(weight), int8=True)
    del weight
    prefix, added = "draft_head", []
    names = [f"{prefix}.q4_codes", f"{prefix}.q4_scales", f"{prefix}.q4_mins"]
    added += [numpy_helper.from_array(array, name) for array, name in zip(arrays, names)]
    if head.k is None:
        head.k = f"{prefix}.k"
        added.append(numpy_helper.from_array(np.array([min(DRAFT_CANDIDATES, n)], np.int64), head.k))
    if head.axis is None:
        head.axis = f"{prefix}.axis"
        added.append(numpy_helper.from_array(np.array([-1], np.int64), head.axis))
    p = f"{prefix}.rescore"
    draft_inputs = [head.activation, *names] + (["", head.norm[0]] if head.norm else [])
    draft = [helper.make_node("MatMulQ4", draft_inputs, [f"{prefix}.approx"], name=f"{prefix}.product",
                              domain=LEPTON_DOMAIN, K=k, N=n, int8=1,
                              **({"epsilon": head.norm[1]} if head.norm else {}))]
    hidden = head.activation
    if head.norm:  # NOTE: the normalized rows the product computed inside, for the rescore
        draft.append(helper.make_node("SimplifiedLayerNormalization", [hidden, head.norm[0]], [f"{p}.normalized"],
                                      name=f"{p}.norm", axis=-1, epsilon=head.norm[1], stash_type=1))
        hidden = f"{p}.normalized"
    if head.scale is not None:
        draft.append(helper.make_node("Mul", [hidden, head.scale], [f"{p}.scaled"], name=f"{p}.scaled"))
        hidden = f"{p}.scaled"
    rows = f"{p}.rows"
    draft += [
        helper.make_node("TopK", [f"{prefix}.approx", head.k], [f"{p}.values", f"{p}.ids"], name=f"{p}.topk",
                         axis=-1, largest=1, sorted=0),
        helper.make_node("Gather", [head.table, f"{p}.ids"], [rows], name=f"{p}.gather", axis=0),  # [L, k, K]
    ]
    if head.bfloat16:
        draft += _rounded(hidden, f"{p}.hidden_bf16") + _rounded(rows, f"{p}.rows_bf16")
        hidden, rows = f"{p}.hidden_bf16", f"{p}.rows_bf16"
    draft += [
        helper.make_node("Unsqueeze", [hidden, head.axis], [f"{p}.column"], name=f"{p}.column"),  # [L, K, 1]
        helper.make_node("MatMul", [rows, f"{p}.column"], [f"{p}.exact3"], name=f"{p}.matmul"),
        helper.make_node("Squeeze", [f"{p}.exact3", head.axis], [f"{p}.exact"], name=f"{p}.exact"),  # [L, k]
        helper.make_node("ScatterElements", [f"{prefix}.approx", f"{p}.ids", f"{p}.exact"], [f"{prefix}.logits"],
                         name=f"{p}.scatter", axis=-1),
    ]
    head.nodes[-1].output[0] = "lm_head.logits"  # NOTE: the head's last node, in the else branch
    branch = helper.make_node(
        "If", [FLAG], ["logits"], name=f"{prefix}.if",
        then_branch=helper.make_graph(draft, prefix, [], [_float_output(f"{prefix}.logits")]),
        else_branch=helper.make_graph(head.nodes, "lm_head", [], [_float_output("lm_head.logits")]))
    nodes = [node for node in graph.node if id(node) not in moved]
    graph.ClearField("node")
    graph.node.extend(nodes + [branch])
    graph.input.append(helper.make_tensor_value_info(FLAG, TensorProto.BOOL, []))
    # NOTE: no initializer goes: the branches read the head's (outer-scope names, not the If's inputs)
    graph.initializer.extend(added)
    return sum(array.nbytes for array in arrays)


def _rounded(name: str, output: str) -> list[onnx.NodeProto]:
    """output = name rounded to bfloat16 (nearest even) and back to float32."""
    return [helper.make_node("Cast", [name], [f"{output}.bits"], name=f"{output}.to", to=TensorProto.BFLOAT16),
            helper.make_node("Cast", [f"{output}.bits"], [output], name=f"{output}.from", to=TensorProto.FLOAT)]


def _float_output(name: str) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, None)

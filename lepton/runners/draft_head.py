"""A 4-bit draft of the lm_head for the steps whose sampler reads only each row's argmax, in memory.

A greedy row without logprobs, penalties or a min_tokens ban reads one thing of its logits: the argmax. Any
cheaper head can pick a few candidates among which it lies, and the head's own arithmetic rescores them. Here
the slot graph's head becomes an `If` on a boolean graph input, `argmax_only`:

- false: the head as it was (its nodes moved into the else branch unchanged: the same logits bit for bit);
- true: Lepton's MatMulQ4 with int8 activations over a q4_1 copy of the head's weight (blocks of 32, d and
  m in float16: 0.625 bytes a weight; SmolLM2's head 17.7 MB a token, against 30.1 in 8 bits, 56.6 in
  bfloat16, 113.2 in float32) takes the top candidates, whose logits are recomputed from the float32 rows of
  the tied embedding as the head computes them, and written over the draft's.

Two heads are drafted. A q8_0 or q4_1 export's rescored 8-bit head (export/nbits.py `rescore_nodes`: MatMulQ8
once q8_graph ran, its rescore one TopKRescore node once rescore_graph ran) already recomputes its top candidates
in float32 from those rows: the draft takes as many and rescores them with a TopKRescore of its own over the same
rows (smoothing's column scale included). A float32 export's head of Lepton's MatMulF32, or MatMulBF16
(weight_dtype=bfloat16), whose weight is the tied embedding's table (still in the graph for the embedding's
Gather), and whose final RMS norm it took in (norm_graph.py): the draft's TopKRescore normalizes the same way,
takes DRAFT_CANDIDATES, and rescores them in float32 from the table, rounded to bfloat16 first (rows and
activations, nearest even, as MatMulBF16 rounds them) for a bfloat16 head, so that both paths give the same
argmax up to float32's order of summation. The then branch is two nodes: MatMulQ4, then TopKRescore
(lepton/native/rescore.c).

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
    k: int | None  # how many candidates (None: DRAFT_CANDIDATES)
    scale: str | None = None  # per K column: the head's weight is table * scale (a smoothed 8-bit head)
    norm: tuple[str, float] | None = None  # the final RMS norm's weight and epsilon, taken into the product
    bfloat16: bool = False  # the head computes in bfloat16 (rows and activations rounded): so does the rescore


def _rescored_head(producers: dict) -> _Head | None:
    """The rescored 8-bit head writing the graph output `logits` (MatMulQ8, then its top candidates rescored by
    TopKRescore: lepton/runners/rescore_graph.py), or None."""
    rescore = producers.get("logits")
    if rescore is None or rescore.op_type != "TopKRescore" or rescore.domain != LEPTON_DOMAIN:
        return None
    product = producers.get(rescore.input[0])
    attrs = {a.name: helper.get_attribute_value(a) for a in rescore.attribute}
    if (product is None or product.op_type != "MatMulQ8" or product.domain != LEPTON_DOMAIN
            or product.input[0] != rescore.input[1] or attrs.get("bfloat16", 0)
            or (len(rescore.input) > 4 and rescore.input[4])):
        return None
    scale = rescore.input[3] if len(rescore.input) > 3 and rescore.input[3] else None
    return _Head([product, rescore], rescore.input[1], rescore.input[2], int(attrs["k"]), scale=scale)


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
    return _Head([product], product.input[0], table, None, norm=norm,
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
    candidates = DRAFT_CANDIDATES if head.k is None else head.k
    draft_inputs = [head.activation, *names] + (["", head.norm[0]] if head.norm else [])
    rescore_inputs = [f"{prefix}.approx", head.activation, head.table, head.scale or ""] + ([head.norm[0]] if head.norm else [])
    draft = [
        helper.make_node("MatMulQ4", draft_inputs, [f"{prefix}.approx"], name=f"{prefix}.product",
                         domain=LEPTON_DOMAIN, K=k, N=n, int8=1, **({"epsilon": head.norm[1]} if head.norm else {})),
        # NOTE: the top candidates rescored as the head computes them (lepton/native/rescore.c): what TopK, Gather,
        # MatMul and ScatterElements did, one task a row
        helper.make_node("TopKRescore", rescore_inputs, [f"{prefix}.logits"], name=f"{prefix}.rescore",
                         domain=LEPTON_DOMAIN, k=candidates, bfloat16=int(head.bfloat16),
                         **({"epsilon": head.norm[1]} if head.norm else {})),
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


def _float_output(name: str) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, None)

"""llama.cpp's Q4_1 and Q8_0 block formats as ONNX Runtime MatMulNBits nodes: a graph rewrite with the onnx package.

Q4_1 (block of 32 along K): w = d * q + m, q in 0..15, d = (max - min) / 15, m = min (a float offset).
MatMulNBits only takes integer zero points on its fast path, so the offset is carried by a second, tiny
product: Y = MatMulNBits(A; q, d, zero point 8) + blocksum(A) @ C, C[b, n] = m + 8 d of output n's block b,
blocksum(A) = A @ S with S the [K, K/32] block indicator. On weights already on a Q4_1 grid (a model
dequantized from a Q4_1 GGUF) it reproduces them to float32 rounding; on others it is Q4_1 quantization.
Q8_0 (the tied lm_head of q4_1, every weight of the q8_0 method): w = d * q, q in -127..127,
d = max|w| / 127 rounded to float16 (as llama.cpp stores it; Lepton's MatMulQ8 reads 2 bytes a block, not 4),
the codes rounded against that d; MatMulNBits bits=8 (its float32 scales hold the float16 values).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from lepton.runners.graph_edit import MS_DOMAIN, replace_nodes
Q4_ZERO = 8  # MatMulNBits' default zero point for bits=4 (no zero_points input)
Q8_ZERO = 128  # and for bits=8


@dataclass(frozen=True)
class BlockWeights:
    """One weight [N, K] in MatMulNBits' layout."""

    bits: int  # 4 or 8
    block_size: int
    codes: np.ndarray  # uint8 [N, K / block_size, block_size] unsigned codes (before packing)
    scales: np.ndarray  # float32 [N, K / block_size]
    offsets: np.ndarray | None  # float32 [N, K / block_size] added per block (Q4_1), None for Q8_0

    def dequantize(self) -> np.ndarray:
        """The float32 [N, K] weight the node computes with."""
        zero = Q4_ZERO if self.bits == 4 else Q8_ZERO
        values = (self.codes.astype(np.float32) - zero) * self.scales[..., None]
        if self.offsets is not None:
            values = values + self.offsets[..., None]
        return values.reshape(self.codes.shape[0], -1)


def quantize_q4_1(weight_nk: np.ndarray, block_size: int = 32) -> BlockWeights:
    """Per-block min/max 4-bit codes with float offsets (llama.cpp quantize_row_q4_1, float32 d and m)."""
    blocks = _blocks(weight_nk, block_size).astype(np.float64)
    low, high = blocks.min(axis=-1), blocks.max(axis=-1)
    step = (high - low) / 15.0
    safe = np.where(step > 0, step, 1.0)
    codes = np.clip(np.rint((blocks - low[..., None]) / safe[..., None]), 0, 15).astype(np.uint8)
    scales = step.astype(np.float32)
    # NOTE: zero point 8 (the default, no zero_points input) measured faster than explicit uint8 zeros
    # and centres the int8-compute part at accuracy level 4, so the offset absorbs 8 d.
    offsets = (low + Q4_ZERO * scales.astype(np.float64)).astype(np.float32)
    return BlockWeights(4, block_size, codes, scales, offsets)


def quantize_q8_0(weight_nk: np.ndarray, block_size: int = 32) -> BlockWeights:
    """Symmetric 8-bit codes per block, d = max|w| / 127 in float16 (llama.cpp quantize_row_q8_0), each code
    rounded against that d (llama.cpp rounds against the float32 d): clipped to -127..127 where d rounded down."""
    blocks = _blocks(weight_nk, block_size).astype(np.float64)
    step = (np.abs(blocks).max(axis=-1) / 127.0).astype(np.float16).astype(np.float64)
    safe = np.where(step > 0, step, 1.0)
    codes = (np.clip(np.rint(blocks / safe[..., None]), -127, 127) + Q8_ZERO).astype(np.uint8)
    return BlockWeights(8, block_size, codes, step.astype(np.float32), None)


def _blocks(weight_nk: np.ndarray, block_size: int) -> np.ndarray:
    rows, cols = weight_nk.shape
    if cols % block_size:
        raise ValueError(f"K = {cols} is not a multiple of the block size {block_size}")
    return weight_nk.reshape(rows, cols // block_size, block_size)


def packed_codes(weights: BlockWeights) -> np.ndarray:
    """MatMulNBits' B: [N, K / block_size, block_size * bits / 8], 4-bit codes low nibble first."""
    if weights.bits == 8:
        return weights.codes
    return (weights.codes[..., 0::2] | (weights.codes[..., 1::2] << 4)).astype(np.uint8)


def nbits_nodes(activation: str, output: str, weights: BlockWeights, prefix: str, accuracy_level: int,
                block_sums: str | None) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Nodes computing output = activation @ weights^T; Q4_1 also needs block_sums = blocksum(activation)."""
    num_out, num_blocks, _ = weights.codes.shape
    inits = [numpy_helper.from_array(packed_codes(weights), f"{prefix}.codes"),
             numpy_helper.from_array(weights.scales, f"{prefix}.scales")]
    product = output if weights.offsets is None else f"{prefix}.nbits"
    nodes = [helper.make_node("MatMulNBits", [activation, inits[0].name, inits[1].name], [product],
                              name=f"{prefix}.MatMulNBits", domain=MS_DOMAIN, K=num_blocks * weights.block_size,
                              N=num_out, bits=weights.bits, block_size=weights.block_size,
                              accuracy_level=accuracy_level)]
    if weights.offsets is not None:
        if block_sums is None:
            raise ValueError("Q4_1 weights need the activation's block sums")
        inits.append(numpy_helper.from_array(np.ascontiguousarray(weights.offsets.T), f"{prefix}.offsets"))
        nodes += [helper.make_node("MatMul", [block_sums, inits[-1].name], [f"{prefix}.offset_sum"],
                                   name=f"{prefix}.offset_matmul"),
                  helper.make_node("Add", [product, f"{prefix}.offset_sum"], [output], name=f"{prefix}.offset_add")]
    return nodes, inits


def block_indicator(size: int, block_size: int) -> np.ndarray:
    """[K, K / block_size] with S[k, b] = 1 where k lies in block b: A @ S sums A over each block."""
    return np.kron(np.eye(size // block_size, dtype=np.float32), np.ones((block_size, 1), np.float32))


@dataclass(frozen=True)
class RewritePlan:
    """What rewrite_matmuls does to each weight MatMul."""

    block_size: int
    accuracy_level: int  # MatMulNBits compute type of the Q4_1 weights (0 = float, 4 = int8 activations)
    head_format: str  # the lm_head: "q4_1", "q8_0" or "fp32" (left as it is)
    head_accuracy_level: int  # of a q8_0 head
    vocab_size: int  # identifies the lm_head: the weight MatMul with N = vocab_size
    body_format: str = "q4_1"  # every other weight: "q4_1" or "q8_0" (at accuracy_level)
    keep_float: frozenset[str] = frozenset()  # activations whose weight products stay float32 MatMuls
    # q4_1 at accuracy level 4: activations whose 4-bit products keep float activations (accuracy level 0)
    float_activations: frozenset[str] = frozenset()
    head_block_size: int | None = None  # of a quantized lm_head; None: block_size
    head_rescore: int = 0  # a quantized lm_head: the logits of its top candidates recomputed in float32; 0 = none


def rewrite_matmuls(model: onnx.ModelProto, plan: RewritePlan) -> int:
    """Replace every MatMul(A, [K, N] initializer) by MatMulNBits nodes per the plan; returns how many."""
    graph = model.graph
    weights = {t.name: t for t in graph.initializer}
    nodes, inits, sums, count, head = [], [], {}, 0, None
    for node in graph.node:
        matrix = _weight_of(node, weights)
        is_head = matrix is not None and matrix.shape[1] == plan.vocab_size
        fmt = plan.head_format if is_head else plan.body_format
        block_size = (plan.head_block_size or plan.block_size) if is_head else plan.block_size
        if (matrix is None or fmt == "fp32" or matrix.shape[0] % block_size
                or node.input[0] in plan.keep_float):
            nodes.append(node)
            continue
        weight_nk = np.ascontiguousarray(matrix.T)
        prefix = node.name or node.output[0]
        rescore = is_head and plan.head_rescore > 0
        product = f"{prefix}.approx" if rescore else node.output[0]
        if fmt == "q8_0":
            block = quantize_q8_0(weight_nk, block_size)
            level = plan.head_accuracy_level if is_head else plan.accuracy_level
            new, extra = nbits_nodes(node.input[0], product, block, prefix, level, None)
        else:
            block = quantize_q4_1(weight_nk, block_size)
            key = (node.input[0], block_size)
            if key not in sums:
                sums[key] = _block_sum_nodes(node.input[0], matrix.shape[0], block_size, nodes, inits)
            level = 0 if node.input[0] in plan.float_activations else plan.accuracy_level
            new, extra = nbits_nodes(node.input[0], product, block, prefix, level, sums[key])
        if rescore:
            # NOTE: the float32 rows stay in the graph, so the tied embedding's Gather keeps reading them.
            table, scale = _float_rows(weight_nk, weights, inits, prefix)
            new += rescore_nodes(node.input[0], product, node.output[0], table, scale,
                                 min(plan.head_rescore, weight_nk.shape[0]), prefix, inits)
        elif is_head and fmt == "q8_0":
            head = (weight_nk, block, extra[0].name)
        nodes += new
        inits += extra
        count += 1
    if head is not None:
        nodes = _gather_tied_embedding(nodes, inits, weights, *head)
    replace_nodes(model, nodes, inits)
    return count


def rescore_nodes(hidden: str, approx: str, output: str, table: str, scale: str | None, count: int, prefix: str,
                  inits: list) -> list[onnx.NodeProto]:
    """output = approx with each row's top `count` logits replaced by (hidden * scale) @ table[candidate] in
    float32 (scale: per column of the table, None = 1).

    The 8-bit head's error stays in the tail (whose probabilities are tiny); the candidates a sampler can
    reach, and greedy's argmax, are the float32 head's whenever the true best lies in the approximate top
    `count` (its int8 error is ~1 % of the largest logit)."""
    k, axis = f"{prefix}.rescore_k", f"{prefix}.rescore_axis"
    inits += [numpy_helper.from_array(np.array([count], np.int64), k),
              numpy_helper.from_array(np.array([-1], np.int64), axis)]
    p = f"{prefix}.rescore"
    scaled = []
    if scale is not None:
        scaled = [helper.make_node("Mul", [hidden, scale], [f"{p}.scaled"], name=f"{p}.scaled")]
        hidden = f"{p}.scaled"
    # NOTE: sorted=0: the candidates' order does not matter to ScatterElements, and sorting costs.
    return scaled + [
        helper.make_node("TopK", [approx, k], [f"{p}.values", f"{p}.ids"], name=f"{p}.topk", axis=-1, largest=1,
                         sorted=0),
        helper.make_node("Gather", [table, f"{p}.ids"], [f"{p}.rows"], name=f"{p}.gather", axis=0),  # [L, k, K]
        helper.make_node("Unsqueeze", [hidden, axis], [f"{p}.column"], name=f"{p}.column"),  # [L, K, 1]
        helper.make_node("MatMul", [f"{p}.rows", f"{p}.column"], [f"{p}.exact3"], name=f"{p}.matmul"),
        helper.make_node("Squeeze", [f"{p}.exact3", axis], [f"{p}.exact"], name=f"{p}.exact"),  # [L, k]
        helper.make_node("ScatterElements", [approx, f"{p}.ids", f"{p}.exact"], [output], name=f"{p}.scatter",
                         axis=-1),
    ]


def _float_rows(weight_nk: np.ndarray, weights: dict[str, onnx.TensorProto], inits: list,
                prefix: str) -> tuple[str, str | None]:
    """A float32 [N, K] table whose columns, times a scale, are the head's weight, and that scale's name (None:
    equal): a tied embedding's (smoothing scales the head's K columns, 1 / s going into the final norm), else a
    new float32 copy of the head."""
    for name, tensor in weights.items():
        if tuple(tensor.dims) != weight_nk.shape or tensor.data_type != onnx.TensorProto.FLOAT:
            continue
        scale = _column_scale(numpy_helper.to_array(tensor), weight_nk)
        if scale is None:
            continue
        if (scale == 1).all():
            return name, None
        inits.append(numpy_helper.from_array(scale, f"{prefix}.rescore_scale"))
        return name, inits[-1].name
    inits.append(numpy_helper.from_array(weight_nk, f"{prefix}.rows"))
    return inits[-1].name, None


def _column_scale(table: np.ndarray, weight: np.ndarray) -> np.ndarray | None:
    """s [K] with weight = table * s to float32 rounding, or None."""
    rows, cols = np.abs(table).argmax(axis=0), np.arange(table.shape[1])
    pivot = table[rows, cols].astype(np.float64)
    if not pivot.all():
        return None
    scale = (weight[rows, cols] / pivot).astype(np.float32)
    # NOTE: smoothing rounds table * s (float64) to float32 once; s itself in float32 adds at most an ulp more,
    # so a few float32 ulps (1.6e-6) separate a scaled tie from any other table.
    return scale if np.allclose(table * scale, weight, rtol=1.6e-6, atol=0) else None


def _gather_tied_embedding(nodes: list, inits: list, weights: dict[str, onnx.TensorProto], weight_nk: np.ndarray,
                           block: BlockWeights, codes: str) -> list[onnx.NodeProto]:
    """Gathers from a table equal to the Q8_0 head read the head's codes (GatherBlockQuantized), not a float copy."""
    num_blocks = block.codes.shape[1]
    scales, width = f"{codes}.gather_scales", f"{codes}.row_width"
    rewritten = []
    for node in nodes:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        table = weights.get(node.input[0]) if node.op_type == "Gather" and attrs.get("axis", 0) == 0 else None
        if table is None or tuple(table.dims) != weight_nk.shape or not np.array_equal(
                numpy_helper.to_array(table), weight_nk):
            rewritten.append(node)
            continue
        if scales not in {t.name for t in inits}:
            inits += [numpy_helper.from_array(block.scales[..., None], scales),
                      numpy_helper.from_array(np.array([num_blocks * block.block_size], np.int64), width)]
        out, ids = node.output[0], node.input[1]
        # NOTE: codes are [vocab, K / 32, 32] (MatMulNBits' layout), so the gathered rows are reshaped to ids + [K].
        rewritten += [
            helper.make_node("GatherBlockQuantized", [codes, ids, scales], [f"{out}.blocks"], name=f"{node.name}.q8_0",
                             domain=MS_DOMAIN, bits=8, block_size=block.block_size, gather_axis=0, quantize_axis=2),
            helper.make_node("Shape", [ids], [f"{out}.ids_shape"], name=f"{node.name}.ids_shape"),
            helper.make_node("Concat", [f"{out}.ids_shape", width], [f"{out}.shape"], name=f"{node.name}.shape",
                             axis=0),
            helper.make_node("Reshape", [f"{out}.blocks", f"{out}.shape"], [out], name=f"{node.name}.rows"),
        ]
    return rewritten


def _weight_of(node: onnx.NodeProto, weights: dict[str, onnx.TensorProto]) -> np.ndarray | None:
    if node.op_type != "MatMul" or node.input[1] not in weights or node.input[0] in weights:
        return None
    tensor = weights[node.input[1]]
    if len(tensor.dims) != 2 or tensor.data_type != onnx.TensorProto.FLOAT:
        return None
    return numpy_helper.to_array(tensor)


def _block_sum_nodes(activation: str, size: int, block_size: int, nodes: list, inits: list) -> str:
    """Append A @ S (the activation summed over each block of K) once per activation; returns its name."""
    name = f"{activation}.block_sums{block_size}"
    indicator = f"block_indicator_{size}x{block_size}"
    if indicator not in {t.name for t in inits}:
        inits.append(numpy_helper.from_array(block_indicator(size, block_size), indicator))
    nodes.append(helper.make_node("MatMul", [activation, indicator], [name], name=f"{name}.matmul"))
    return name

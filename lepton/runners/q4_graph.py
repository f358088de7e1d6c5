"""4-bit weight products of q4_1 exports rewritten to Lepton's MatMulQ4 (lepton/native/q4_matmul.c), in memory.

A q4_1 export (export/nbits.py) computes each weight product as MatMulNBits(A; q, d, zero point 8) plus a
second, tiny product blocksum(A) @ C (C: each block's offset m + 8 d), added. MatMulQ4 computes the same
product, w = d q + m per block of 32, in one node: the codes packed for AVX-512 BF16's dot products, d and m
in float16 (as a Q4_1 GGUF stores them: exact for weights dequantized from one, a float16 rounding of each
block's scale and minimum otherwise) and the activations rounded to bfloat16 (as weight_dtype=bfloat16
rounds them), or, where the export asks for accuracy level 4 (int8 compute), quantized to int8 per block of
32 as MatMulNBits does (MatMulQ4's int8 = 1: AVX-512 VNNI's integer dots). On a processor with AVX2 but no
AVX-512 BF16 the products at accuracy level 0 take int16 activations instead of bfloat16 (MatMulQ4's int16 = 1,
`int16_activations`: quantized per block of 32, more exact than bfloat16 and twice the products an instruction
of AVX2's vpmaddwd against an FMA's). A float32 weight product left (the
lm_head of `--lm-head fp32`) becomes MatMulBF16 (lepton/runners/bf16_graph.py; the preset's 8-bit head goes to
MatMulQ8 in the runner), and the block sums nobody reads any more go.
The rewrite happens when the runner builds its session (RunnerConfig.matmul_kernel); what it serves is
judged by the q4_1 quality gate, which export quantize measures through the runner.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from lepton.native import DOMAIN as LEPTON_DOMAIN
from lepton.runners.bf16_graph import bf16_graph
from lepton.runners.graph_edit import MS_DOMAIN, add_rewritten, drop_dead_nodes

BLOCK, LANES, GROUPS = 32, 16, 8
ZERO_POINT = 8  # MatMulNBits' default for bits=4 (a q4_1 export gives none)
INT8_LEVEL = 4  # MatMulNBits' accuracy level of int8 compute (activations quantized per block)


def pack(codes: np.ndarray, scales: np.ndarray, mins: np.ndarray,
         int8: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Codes [N, K / 32, 32] (0..15) and float32 scales d and minimums m [N, K / 32] (w = d q + m) ->
    MatMulQ4's B [ceil(N / 16), K / 32, 256] uint8 and scales, mins float16 [ceil(N / 16), K / 32, 16].
    bfloat16 activations: per block, 8 groups of 32 bytes, byte 2l + t of group g holding output l's inputs
    4g + t (low nibble) and 4g + 2 + t (high nibble); int8 activations (int8=True, MatMulQ4's int8 = 1): per
    block, 4 vectors of 64 bytes, byte 4l + t of vector v holding output l's inputs 8v + t (low nibble) and
    8v + 4 + t (high nibble), so one AND gives a group's codes as vpdpbusd reads them and a shift and an
    AND the next group's. Outputs past N in the last panel get code 0, scale 0 and minimum 0."""
    n, blocks, block = codes.shape
    if block != BLOCK:
        raise ValueError(f"codes: blocks of {block} values, MatMulQ4 takes {BLOCK}")
    if codes.max(initial=0) > 15:
        raise ValueError(f"codes: {int(codes.max())} does not fit 4 bits")
    panels = -(-n // LANES)
    padded = np.zeros((panels * LANES, blocks, BLOCK), np.uint8)
    padded[:n] = codes
    if int8:  # [P, lanes, blocks, 4 v, 2 nibbles, 4 t] -> [P, blocks, 4 v, lanes, 4 t]
        split = padded.reshape(panels, LANES, blocks, GROUPS // 2, 2, 4)
        packed = (split[..., 0, :] | (split[..., 1, :] << 4)).transpose(0, 2, 3, 1, 4)
    else:  # [P, lanes, blocks, 8 groups, 2 nibbles, 2 t] -> [P, blocks, 8 groups, lanes, 2 t]
        split = padded.reshape(panels, LANES, blocks, GROUPS, 2, 2)
        packed = (split[..., 0, :] | (split[..., 1, :] << 4)).transpose(0, 2, 3, 1, 4)

    def per_lane(values: np.ndarray) -> np.ndarray:
        out = np.zeros((panels * LANES, blocks), np.float16)
        out[:n] = np.asarray(values, np.float32).reshape(n, blocks)
        return np.ascontiguousarray(out.reshape(panels, LANES, blocks).transpose(0, 2, 1))

    return np.ascontiguousarray(packed).reshape(panels, blocks, GROUPS * 2 * LANES), per_lane(scales), per_lane(mins)


def unpack_codes(nbits_b: np.ndarray, n: int, blocks: int) -> np.ndarray:
    """MatMulNBits' 4-bit B [N, K / 32, 16] (low nibble first) -> codes [N, K / 32, 32]."""
    b = nbits_b.reshape(n, blocks, BLOCK // 2)
    codes = np.empty((n, blocks, BLOCK), np.uint8)
    codes[..., 0::2], codes[..., 1::2] = b & 15, b >> 4
    return codes


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _q4_1_products(graph: onnx.GraphProto, initializers: dict) -> list[tuple[onnx.NodeProto, onnx.NodeProto, onnx.NodeProto]]:
    """(MatMulNBits, offset MatMul, Add) of every q4_1 product: a 4-bit MatMulNBits in blocks of 32 (no zero
    points) whose output only an Add reads, the Add's other input a MatMul of block sums by a [K / 32, N]
    initializer read by nothing else."""
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    producer = {out: node for node in graph.node for out in node.output}
    outputs = {o.name for o in graph.output}
    found = []
    for node in graph.node:
        attrs = _attrs(node)
        if (node.op_type != "MatMulNBits" or node.domain != MS_DOMAIN or attrs.get("bits") != 4
                or attrs.get("block_size") != BLOCK or attrs.get("K", 0) % BLOCK or any(node.input[3:])
                or node.input[1] not in initializers or node.input[2] not in initializers):
            continue
        product = node.output[0]
        adds = readers.get(product, [])
        if product in outputs or len(adds) != 1 or adds[0].op_type != "Add":
            continue
        add = adds[0]
        other = add.input[1] if add.input[0] == product else add.input[0]
        offset = producer.get(other)
        if (offset is None or offset.op_type != "MatMul" or other in outputs or len(readers.get(other, [])) != 1
                or offset.input[1] not in initializers):
            continue
        table = initializers[offset.input[1]]
        if table.data_type != onnx.TensorProto.FLOAT or tuple(table.dims) != (attrs["K"] // BLOCK, attrs["N"]):
            continue
        found.append((node, offset, add))
    return found


def q4_graph(model: onnx.ModelProto, bfloat16: bool = True, int16: bool = False) -> tuple[int, int]:
    """Rewrite every q4_1 product to MatMulQ4 and the float32 weight products then left to MatMulBF16, in
    place; returns how many of each. int16=True: the products at accuracy level 0 quantize their activations to
    int16 (MatMulQ4's int16 = 1) instead of rounding them to bfloat16. bfloat16=False (a processor with neither AVX-512 BF16 nor AVX2 + FMA, where
    MatMulQ4's bfloat16 path and MatMulBF16 would run plain C): only the products at accuracy level 4 (int8
    activations) become MatMulQ4; those at level 0 stay ONNX Runtime's MatMulNBits and the float32 ones
    MatMul."""
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    products = [found for found in _q4_1_products(graph, initializers)
                if bfloat16 or _attrs(found[0]).get("accuracy_level", 0) == INT8_LEVEL]
    if not products:
        return 0, 0
    replaced: dict[int, onnx.NodeProto] = {}  # NOTE: id of each Add -> its MatMulQ4, in the Add's place
    gone = set()
    added = []
    for nbits, offset, add in products:
        attrs = _attrs(nbits)
        k, n = attrs["K"], attrs["N"]
        blocks = k // BLOCK
        codes = unpack_codes(numpy_helper.to_array(initializers[nbits.input[1]]), n, blocks)
        scales = numpy_helper.to_array(initializers[nbits.input[2]]).astype(np.float32).reshape(n, blocks)
        offsets = numpy_helper.to_array(initializers[offset.input[1]]).astype(np.float32).T  # [N, K / 32]
        mins = offsets - np.float32(ZERO_POINT) * scales  # NOTE: w = (q - 8) d + offset = d q + m
        prefix = nbits.name or nbits.output[0]
        names = [f"{prefix}.q4_codes", f"{prefix}.q4_scales", f"{prefix}.q4_mins"]
        # NOTE: accuracy level 4 (int8 compute) is what the export was gated with: MatMulQ4 takes int8 activations
        int8 = attrs.get("accuracy_level", 0) == INT8_LEVEL
        arrays = pack(codes, scales, mins, int8=int8)
        added += [numpy_helper.from_array(array, name) for array, name in zip(arrays, names)]
        kind = {"int8": 1} if int8 else {"int16": 1} if int16 else {"int8": 0}
        replaced[id(add)] = helper.make_node("MatMulQ4", [nbits.input[0], *names], list(add.output), name=prefix,
                                             domain=LEPTON_DOMAIN, K=k, N=n, **kind)
        gone.update((id(nbits), id(offset)))
    nodes = [replaced.get(id(node), node) for node in graph.node if id(node) not in gone]
    graph.ClearField("node")
    graph.node.extend(nodes)
    drop_dead_nodes(graph)  # NOTE: the block sums the offsets took
    add_rewritten(model, added, LEPTON_DOMAIN)
    return len(products), bf16_graph(model) if bfloat16 else 0

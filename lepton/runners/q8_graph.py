"""8-bit weight products rewritten to Lepton's MatMulQ8 (lepton/native/q8_matmul.c), in memory.

ONNX Runtime's MatMulNBits with bits=8, block_size=32, no zero points and accuracy_level=4 (what
`export quantize --method q8_0` writes) quantizes its activations to int8 per block of 32 and multiplies
them with the weights' int8 codes; MatMulQ8 computes the same products with the codes packed for the
vector units (AVX-512 VNNI vpdpbusd: 16 outputs x 4 inputs per instruction) and the scales in float16
(what `export quantize` writes are float32 values float16 holds exactly, export/nbits.py), so each node's
weights are repacked here once, when the runner builds its session. Any other MatMulNBits (4 bits, zero
points, another block size or accuracy level, or a scale float16 does not hold: an export quantized before
2026-12-06) is kept.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from lepton.autoselect import cpu_features
from lepton.native import DOMAIN as LEPTON_DOMAIN
from lepton.runners.graph_edit import MS_DOMAIN, add_rewritten

BLOCK, LANES = 32, 16


def pack(codes: np.ndarray, scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """MatMulNBits' codes [N, K / 32, 32] uint8 and scales [N * K / 32] (or [N, K / 32]) float32 ->
    MatMulQ8's B [ceil(N / 16), K / 32, 512] uint8 (per block: 8 groups of 4 inputs x 16 outputs x 4)
    and scales [ceil(N / 16), K / 32, 16] float16. Outputs past N in the last panel get code 128 and scale 0.
    A scale float16 does not hold exactly is refused (ValueError): MatMulQ8 would compute another product."""
    n, blocks, block = codes.shape
    if block != BLOCK:
        raise ValueError(f"codes: blocks of {block} values, MatMulQ8 takes {BLOCK}")
    scales = np.asarray(scales, np.float32).reshape(n, blocks)
    if not half_exact(scales):
        raise ValueError("scales: a value float16 does not hold exactly; MatMulQ8 keeps its scales in float16 "
                         "(quantize again: export/nbits.py rounds them)")
    panels = -(-n // LANES)
    padded = np.full((panels * LANES, blocks, BLOCK), 128, np.uint8)
    padded[:n] = codes
    padded_scales = np.zeros((panels * LANES, blocks), np.float16)
    padded_scales[:n] = scales
    # [P, 16 lanes, blocks, 8 groups, 4] -> [P, blocks, 8 groups, 16 lanes, 4]
    packed = padded.reshape(panels, LANES, blocks, BLOCK // 4, 4).transpose(0, 2, 3, 1, 4)
    return (np.ascontiguousarray(packed).reshape(panels, blocks, BLOCK * LANES),
            np.ascontiguousarray(padded_scales.reshape(panels, LANES, blocks).transpose(0, 2, 1)))


def rewritable(node: onnx.NodeProto, initializers: dict[str, onnx.TensorProto]) -> bool:
    """A MatMulNBits node MatMulQ8 computes the same as (see the module docstring)."""
    if node.op_type != "MatMulNBits" or node.domain != MS_DOMAIN:
        return False
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    extra = [name for name in node.input[3:] if name]  # NOTE: zero points, g_idx, bias
    return (attrs.get("bits") == 8 and attrs.get("block_size") == BLOCK and attrs.get("accuracy_level") == 4
            and attrs.get("K", 0) % BLOCK == 0 and not extra
            and node.input[1] in initializers and node.input[2] in initializers
            and half_exact(numpy_helper.to_array(initializers[node.input[2]])))


def half_exact(scales: np.ndarray) -> bool:
    """Every scale a finite value float16 holds exactly (MatMulQ8's scales are float16)."""
    scales = np.asarray(scales, np.float32)
    with np.errstate(over="ignore"):
        return bool(np.isfinite(scales).all() and np.array_equal(scales.astype(np.float16).astype(np.float32), scales))


def q8_graph(model: onnx.ModelProto) -> int:
    """Rewrite every rewritable MatMulNBits of the model in place; returns how many."""
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    added, count = [], 0
    for node in graph.node:
        if not rewritable(node, initializers):
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        codes = numpy_helper.to_array(initializers[node.input[1]]).reshape(attrs["N"], attrs["K"] // BLOCK, BLOCK)
        b, s = pack(codes, numpy_helper.to_array(initializers[node.input[2]]))
        names = [f"{node.name or node.output[0]}.q8_codes", f"{node.name or node.output[0]}.q8_scales"]
        added += [numpy_helper.from_array(b, names[0]), numpy_helper.from_array(s, names[1])]
        replacement = helper.make_node("MatMulQ8", [node.input[0], *names], list(node.output), name=node.name,
                                       domain=LEPTON_DOMAIN, K=attrs["K"], N=attrs["N"])
        node.CopyFrom(replacement)
        count += 1
    if count:
        add_rewritten(model, added, LEPTON_DOMAIN)
    return count


def matmul_kernel(setting: str, library: Path | None, cpu: dict | None = None,
                  method: str = "q8_0", int8_activations: bool = False) -> tuple[str, str]:
    """RunnerConfig.matmul_kernel -> ("lepton" or "onnxruntime", why) for a `method` export's products:
    "auto" takes Lepton's operator when its library is built and the processor has what it was measured
    faster with (docs/performance.md): AVX-512 VNNI, or AVX2 + FMA, for q8_0's MatMulQ8 and for a q4_1 export
    with int8 activations (accuracy level 4; its products at level 0 and a float32 head too where AVX-512 BF16
    or AVX2 + FMA is there, see bfloat16_kernels), AVX-512 BF16 or AVX2 + FMA for q4_1's MatMulQ4 with bfloat16 ones
    (lepton/runners/q4_graph.py), AVX-512F, or AVX2 + FMA, for a float32 export's MatMulF32 (method "float32",
    lepton/runners/f32_graph.py); elsewhere the operators run plain C, which only an explicit
    matmul_kernel=lepton asks for."""
    if setting == "onnxruntime":
        return "onnxruntime", "matmul_kernel=onnxruntime"
    if library is None:
        if setting == "lepton":
            raise RuntimeError("matmul_kernel=lepton: lepton/native/liblepton_ops.so is not built (or older than "
                               "its sources); run scripts/build_native.sh (make setup does), or set "
                               "matmul_kernel=onnxruntime")
        return "onnxruntime", "lepton/native is not built or older than its sources: scripts/build_native.sh builds it"
    if setting == "lepton":
        return "lepton", "matmul_kernel=lepton"
    cpu = cpu_features() if cpu is None else cpu
    avx2 = bool(cpu.get("avx2") and cpu.get("fma"))
    if method == "float32":
        if cpu.get("avx512f"):
            return "lepton", "AVX-512F"
        return ("lepton", "AVX2 + FMA") if avx2 else ("onnxruntime", "neither AVX-512F nor AVX2 + FMA on this processor")
    if method == "q4_1" and not int8_activations:
        if cpu.get("avx512_bf16") and cpu.get("avx512f"):
            return "lepton", "AVX-512 BF16"
        return ("lepton", "AVX2 + FMA") if avx2 else ("onnxruntime", "neither AVX-512 BF16 nor AVX2 + FMA on this processor")
    if cpu.get("avx512_vnni") and cpu.get("avx512f"):
        name = "AVX-512 VNNI"
    elif avx2:
        name = "AVX2 + FMA"
    else:
        return "onnxruntime", "neither AVX-512 VNNI nor AVX2 + FMA on this processor"
    if method == "q4_1" and not bfloat16_kernels(setting, cpu):
        return "lepton", (f"{name}; neither AVX-512 BF16 nor AVX2 + FMA, so the products at accuracy level 0 stay "
                          f"ONNX Runtime's MatMulNBits and the float32 ones MatMul")
    return "lepton", name


def bfloat16_kernels(setting: str, cpu: dict | None = None) -> bool:
    """Whether Lepton's bfloat16 paths (MatMulQ4 at accuracy level 0, MatMulBF16) take a q4_1 export's
    products beside its int8 ones: where the processor has AVX-512 BF16 or AVX2 + FMA (both operators' AVX2
    paths widen to float32: 30 level-0 products of 576 x 960 on an AVX2-only EPYC, one row, 29 us a node
    against MatMulNBits' 122), with matmul_kernel auto or lepton (elsewhere MatMulQ4's bfloat16 activations
    have plain C only, ~10x slower: lepton/runners/q4_graph.py leaves those products to ONNX Runtime)."""
    cpu = cpu_features() if cpu is None else cpu
    return bool((cpu.get("avx512_bf16") and cpu.get("avx512f")) or (cpu.get("avx2") and cpu.get("fma")))


def int16_activations(cpu: dict | None = None) -> bool:
    """Whether MatMulQ4's products at accuracy level 0 take int16 activations (int16 = 1) rather than bfloat16:
    where the processor has AVX2 + FMA but no AVX-512 BF16. There the bfloat16 path widens the codes to float32
    and multiplies with FMAs (8 products an instruction), int16 codes with vpmaddwd (16, exact in int32), and
    int16 per block of 32 is the more exact rounding (lepton/native/q4_matmul.c; an AVX2-only EPYC, one thread,
    1,536 x 576: 16 rows 550 -> 259 us, docs/performance.md). With AVX-512 BF16, vdpbf16ps (32 products) stays."""
    cpu = cpu_features() if cpu is None else cpu
    return bool(not (cpu.get("avx512_bf16") and cpu.get("avx512f")) and cpu.get("avx2") and cpu.get("fma"))

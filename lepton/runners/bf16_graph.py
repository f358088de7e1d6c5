"""A float32 export's weight products in bfloat16 through Lepton's MatMulBF16 (lepton/native/bf16_matmul.c).

RunnerConfig.weight_dtype=bfloat16: every product of an activation with a float32 weight initializer
(`Gemm` with transB=1 and alpha=1 — what the exporter writes; a bias is added after — or `MatMul` with a
2-D weight) is rewritten, in memory when the runner builds its session, to MatMulBF16 with the weights
rounded to bfloat16 (nearest even) and packed for AVX-512 BF16's vdpbf16ps (panels of 16 outputs x pairs
of inputs; a processor with AVX2 and FMA but no AVX-512 BF16 widens them to float32 as it reads them, half the
bytes of float32 weights); the activations are rounded to bfloat16 per product, the sums stay float32. Everything else
(norms, attention, the K/V cache, the embedding lookup) stays float32, as the export wrote it.
"""

from __future__ import annotations

import numpy as np
import onnx

from lepton.runners.graph_edit import float_weight, rewrite_float_products

LANES = 16


def unavailable(cpu: dict | None = None) -> str:
    """'' when weight_dtype=bfloat16 can run fast here, else why not (the processor, the library)."""
    from lepton.autoselect import cpu_features
    from lepton.native import ops_library

    cpu = cpu_features() if cpu is None else cpu
    if not ((cpu.get("avx512_bf16") and cpu.get("avx512f")) or (cpu.get("avx2") and cpu.get("fma"))):
        return "neither AVX512-BF16 nor AVX2 + FMA on this processor"
    if ops_library() is None:
        return "lepton/native is not built (scripts/build_native.sh; make setup runs it)"
    return ""


def instructions(cpu: dict | None = None) -> str:
    """The instructions MatMulBF16 computes with here (its best path: lepton/native/bf16_matmul.c)."""
    from lepton.autoselect import cpu_features

    cpu = cpu_features() if cpu is None else cpu
    return "AVX-512 BF16" if cpu.get("avx512_bf16") and cpu.get("avx512f") else "AVX2 + FMA"


def to_bf16(values: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (uint16) as the operator rounds its activations (vcvtne2ps2bf16): nearest
    even, a NaN quiet, a denormal flushed to a signed zero."""
    values = np.ascontiguousarray(values, np.float32)
    bits = values.view(np.uint32)
    rounded = ((bits.astype(np.uint64) + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    tiny = (bits & 0x7F800000) == 0
    rounded[tiny] = ((bits[tiny] >> 16) & 0x8000).astype(np.uint16)
    nan = np.isnan(values)
    rounded[nan] = ((bits[nan] >> 16) | 0x40).astype(np.uint16)
    return rounded


def from_bf16(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bits (uint16) -> float32."""
    return (np.atleast_1d(np.asarray(bits, np.uint16)).astype(np.uint32) << 16).view(np.float32).reshape(np.shape(bits))


def pack(weight_nk: np.ndarray) -> np.ndarray:
    """Weights [N, K] float32 (K even) -> MatMulBF16's B [ceil(N / 16), K / 2, 32] uint16: per panel of
    16 outputs and pair of inputs, output l's two weights at 2l and 2l + 1. Outputs past N are 0."""
    n, k = weight_nk.shape
    if k % 2:
        raise ValueError(f"weights with K = {k} inputs: MatMulBF16 takes inputs in pairs (K even)")
    panels = -(-n // LANES)
    padded = np.zeros((panels * LANES, k), np.float32)
    padded[:n] = weight_nk
    # [P, 16 lanes, K / 2 pairs, 2] -> [P, K / 2 pairs, 16 lanes, 2]
    packed = to_bf16(padded).reshape(panels, LANES, k // 2, 2).transpose(0, 2, 1, 3)
    return np.ascontiguousarray(packed).reshape(panels, k // 2, 2 * LANES)


def weight_of(node: onnx.NodeProto, initializers: dict[str, onnx.TensorProto]) -> np.ndarray | None:
    """The [N, K] float32 weight of a product MatMulBF16 computes (a Gemm's bias then added), else None."""
    weight = float_weight(node, initializers)
    return weight if weight is not None and weight.shape[1] % 2 == 0 else None


def bf16_graph(model: onnx.ModelProto) -> int:
    """Rewrite every product of an activation with a float32 weight to MatMulBF16, in place; returns how
    many. A weight other nodes also read (a tied embedding's table) stays for them in float32."""
    return rewrite_float_products(model, "MatMulBF16", "bf16", pack, weight_of)

"""A float32 export's weight products through Lepton's MatMulF32 (lepton/native/f32_matmul.c).

RunnerConfig.matmul_kernel picks it for a float32 export (weight_dtype=export): every product of an activation
with a float32 weight initializer (what lepton.runners.graph_edit.float_weight takes: the exporter's Gemms and
2-D MatMuls) is rewritten, in memory when the runner builds its session, to MatMulF32 with the weights packed for
the vector units (panels of 16 outputs, input k's 16 weights side by side); weights, activations and sums stay
float32. ONNX Runtime's MLAS read the weights at ~28 GB/s for one row and reached ~137 GFLOP/s for 16 here
(benchmarks.products); MatMulF32 takes a decode step's rows in one pass over each panel
(docs/performance.md). Then the MLP's gate, the residual adds and the RMS norms go into the products
(epilogue_graph, norm_graph), as for the other weight products.
"""

from __future__ import annotations

import numpy as np
import onnx

from lepton.runners.graph_edit import float_weight, rewrite_float_products

LANES = 16


def pack(weight_nk: np.ndarray) -> np.ndarray:
    """Weights [N, K] float32 -> MatMulF32's B [ceil(N / 16), K, 16] float32: per panel of 16 outputs, input k's
    16 weights at [panel, k]. Outputs past N are 0."""
    n, k = weight_nk.shape
    panels = -(-n // LANES)
    padded = np.zeros((panels * LANES, k), np.float32)
    padded[:n] = weight_nk
    return np.ascontiguousarray(padded.reshape(panels, LANES, k).transpose(0, 2, 1))


def f32_graph(model: onnx.ModelProto) -> int:
    """Rewrite every product of an activation with a float32 weight to MatMulF32, in place; returns how many. A
    weight other nodes also read (a tied embedding's table) stays for them as it was."""
    return rewrite_float_products(model, "MatMulF32", "f32", pack, float_weight)

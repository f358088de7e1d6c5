"""Time one decode step's weight products alone: SmolLM2-135M's 30 layers (qkv 576x960, o 576x576, gate_up
576x3072, down 1536x576) and its lm_head (576x49152), each with weights of its own (out of cache, as in a
step), as one ONNX Runtime graph of Lepton's MatMulBF16, MatMulQ8 or MatMulQ4 nodes or float32 Gemms (MLAS).
q4 is what a q4_1 export is served with: the layers' MatMulQ4, the lm_head's MatMulBF16; q4-int8 the same with
int8 activations (MatMulQ4's int8 = 1: a q4_1 export at accuracy level 4).

    python -m benchmarks.products --kind bf16 --rows 1,16,128

Random weights (only the speed is measured); 2 intra-op threads spinning at most 100 us, as the runner
computes. Run the kinds one after another, alternating, several times: this machine's speed drifts.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from lepton.native import DOMAIN, LIBRARY

LAYER = ((576, 960), (576, 576), (576, 3072), (1536, 576))  # (K, N) of each product
LM_HEAD = (576, 49152)


def products_model(kind: str, layers: int = 30, seed: int = 0):
    rng = np.random.default_rng(seed)
    nodes, initializers, outputs = [], [], []
    for i, (k, n) in enumerate([s for _ in range(layers) for s in LAYER] + [LM_HEAD]):
        panels = -(-n // 16)
        if kind == "bf16" or (kind.startswith("q4") and (k, n) == LM_HEAD):
            codes = rng.integers(0, 1 << 16, (panels, k // 2, 32), dtype=np.uint16) & 0xBFFF  # NOTE: finite values
            initializers.append(numpy_helper.from_array(codes, f"w{i}"))
            nodes.append(helper.make_node("MatMulBF16", [f"a{k}", f"w{i}"], [f"y{i}"], domain=DOMAIN, K=k, N=n))
        elif kind == "q8":
            codes = rng.integers(1, 256, (panels, k // 32, 512), dtype=np.uint8)
            scales = rng.uniform(1e-3, 2e-2, (panels, k // 32, 16)).astype(np.float32)
            initializers += [numpy_helper.from_array(codes, f"w{i}"), numpy_helper.from_array(scales, f"s{i}")]
            nodes.append(helper.make_node("MatMulQ8", [f"a{k}", f"w{i}", f"s{i}"], [f"y{i}"], domain=DOMAIN, K=k, N=n))
        elif kind in ("q4", "q4-int8"):
            codes = rng.integers(0, 256, (panels, k // 32, 256), dtype=np.uint8)
            scales = rng.uniform(1e-3, 2e-2, (2, panels, k // 32, 16)).astype(np.float16)
            initializers += [numpy_helper.from_array(codes, f"w{i}"), numpy_helper.from_array(scales[0], f"s{i}"),
                             numpy_helper.from_array(-8 * scales[1], f"m{i}")]
            nodes.append(helper.make_node("MatMulQ4", [f"a{k}", f"w{i}", f"s{i}", f"m{i}"], [f"y{i}"], domain=DOMAIN,
                                          K=k, N=n, int8=int(kind == "q4-int8")))
        else:
            weight = (rng.standard_normal((n, k)) * 0.02).astype(np.float32)
            initializers.append(numpy_helper.from_array(weight, f"w{i}"))
            nodes.append(helper.make_node("Gemm", [f"a{k}", f"w{i}"], [f"y{i}"], transB=1))
        outputs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, ["m", n]))
    inputs = [helper.make_tensor_value_info(f"a{k}", TensorProto.FLOAT, ["m", k]) for k in (576, 1536)]
    graph = helper.make_graph(nodes, "products", inputs, outputs, initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(DOMAIN, 1)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.products", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", choices=("bf16", "q8", "q4", "q4-int8", "fp32"), required=True)
    parser.add_argument("--rows", default="1,16,128", help="rows (tokens) of each timed run, comma separated")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--library", type=Path, default=LIBRARY, help="the operators' library (another build to compare)")
    args = parser.parse_args(argv)
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.add_session_config_entry("session.intra_op.spin_duration_us", "100")
    if args.kind != "fp32":
        if not args.library.is_file():
            sys.exit(f"benchmarks.products: {args.library} is not built (scripts/build_native.sh)")
        options.register_custom_ops_library(str(args.library))
    session = ort.InferenceSession(products_model(args.kind).SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    line = []
    for rows in (int(r) for r in args.rows.split(",")):
        feeds = {f"a{k}": rng.standard_normal((rows, k)).astype(np.float32) for k in (576, 1536)}
        session.run(None, feeds)
        times = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            session.run(None, feeds)
            times.append((time.perf_counter() - started) * 1e3)
        line.append(f"{rows} rows {statistics.median(times):.2f} ms (min {min(times):.2f})")
    print(f"{args.kind}: " + ", ".join(line), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

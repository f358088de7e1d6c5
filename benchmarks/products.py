"""Time one decode step's weight products alone: SmolLM2-135M's 30 layers (qkv 576x960, o 576x576, gate_up
576x3072, down 1536x576) and its lm_head (576x49152), each with weights of its own (out of cache, as in a
step), as one ONNX Runtime graph of Lepton's MatMulBF16, MatMulF32 (f32), MatMulQ8 or MatMulQ4 nodes or float32 Gemms
(MLAS: fp32).
q4: the layers' MatMulQ4 with bfloat16 activations and the lm_head's MatMulBF16; q4-int8 the same with int8
activations (MatMulQ4's int8 = 1, accuracy level 4; the q4_1 preset serves 90 of its 120 layer products so, 30
with bfloat16 activations, and its lm_head in 8 bits, MatMulQ8); q4-int16 the same with int16 activations
(MatMulQ4's int16 = 1: what those 30 take on a processor with AVX2 but no AVX-512 BF16).

    python -m benchmarks.products --kind bf16 --rows 1,16,128

Random weights (only the speed is measured), in transparent huge pages where the kernel gives them; 2 intra-op
threads spinning at most 100 us, as the runner computes. Run the kinds one after another, alternating, several
times: this machine's speed drifts. To compare builds of the operators, give each with --library: one process
alternates between them, --rounds times:

    python -m benchmarks.products --kind bf16 --rows 1,16,128 --library /tmp/old.so --library \
        lepton/native/liblepton_ops.so --rounds 4
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

from lepton.memory import advise_huge_pages
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
        elif kind == "f32":
            packed = (rng.standard_normal((panels, k, 16)) * 0.02).astype(np.float32)
            initializers.append(numpy_helper.from_array(packed, f"w{i}"))
            nodes.append(helper.make_node("MatMulF32", [f"a{k}", f"w{i}"], [f"y{i}"], domain=DOMAIN, K=k, N=n))
        elif kind == "q8":
            codes = rng.integers(1, 256, (panels, k // 32, 512), dtype=np.uint8)
            scales = rng.uniform(1e-3, 2e-2, (panels, k // 32, 16)).astype(np.float16)
            initializers += [numpy_helper.from_array(codes, f"w{i}"), numpy_helper.from_array(scales, f"s{i}")]
            nodes.append(helper.make_node("MatMulQ8", [f"a{k}", f"w{i}", f"s{i}"], [f"y{i}"], domain=DOMAIN, K=k, N=n))
        elif kind in ("q4", "q4-int8", "q4-int16"):
            codes = rng.integers(0, 256, (panels, k // 32, 256), dtype=np.uint8)
            scales = rng.uniform(1e-3, 2e-2, (2, panels, k // 32, 16)).astype(np.float16)
            initializers += [numpy_helper.from_array(codes, f"w{i}"), numpy_helper.from_array(scales[0], f"s{i}"),
                             numpy_helper.from_array(-8 * scales[1], f"m{i}")]
            nodes.append(helper.make_node("MatMulQ4", [f"a{k}", f"w{i}", f"s{i}", f"m{i}"], [f"y{i}"], domain=DOMAIN,
                                          K=k, N=n, **({"int16": 1} if kind == "q4-int16" else {"int8": int(kind == "q4-int8")})))
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
    parser.add_argument("--kind", choices=("bf16", "f32", "q8", "q4", "q4-int8", "q4-int16", "fp32"), required=True)
    parser.add_argument("--rows", default="1,16,128", help="rows (tokens) of each timed run, comma separated")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--library", type=Path, action="append",
                        help="the operators' library (default: lepton.native's); given several times, each gets a "
                             "session of its own and the runs alternate between them, round after round")
    parser.add_argument("--rounds", type=int, default=1, help="rounds of every rows count on every library")
    args = parser.parse_args(argv)
    libraries = args.library or [LIBRARY]
    sessions = [session(args.kind, library, args.threads) for library in libraries]
    advise_huge_pages()  # NOTE: as the runners hold their weights: in 4 KiB pages a one-row product read ~25 % slower
    rng = np.random.default_rng(1)
    rows_list = [int(r) for r in args.rows.split(",")]
    feeds = {rows: {f"a{k}": rng.standard_normal((rows, k)).astype(np.float32) for k in (576, 1536)} for rows in rows_list}
    medians: dict[tuple[int, int], list[float]] = {}
    for _ in range(args.rounds):
        for rows in rows_list:
            for index, sess in enumerate(sessions):
                medians.setdefault((index, rows), []).append(time_runs(sess, feeds[rows], args.repeats))
    for index, library in enumerate(libraries):
        name = "" if len(libraries) == 1 else f" [{library}]"
        print(f"{args.kind}{name}: " + ", ".join(
            f"{rows} rows {statistics.median(medians[index, rows]):.2f} ms"
            + (f" (rounds {' '.join(f'{t:.2f}' for t in medians[index, rows])})" if args.rounds > 1 else "")
            for rows in rows_list), flush=True)
    return 0


def session(kind: str, library: Path, threads: int) -> ort.InferenceSession:
    """The products of `kind` in a session with `threads` intra-op threads spinning at most 100 us."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.spin_duration_us", "100")
    if kind != "fp32":
        if not library.is_file():
            sys.exit(f"benchmarks.products: {library} is not built (scripts/build_native.sh)")
        options.register_custom_ops_library(str(library))
    return ort.InferenceSession(products_model(kind).SerializeToString(), options, providers=["CPUExecutionProvider"])


def time_runs(sess: ort.InferenceSession, feeds: dict, repeats: int) -> float:
    """The median ms of `repeats` runs after one untimed run."""
    sess.run(None, feeds)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        sess.run(None, feeds)
        times.append((time.perf_counter() - started) * 1e3)
    return statistics.median(times)


if __name__ == "__main__":
    sys.exit(main())

"""Weight products alone on this processor: fp32 `MatMul` against 8-bit `MatMulNBits` at each accuracy level.

A graph of `--pairs` product pairs shaped like a Llama MLP (hidden x intermediate, then back), random
weights, run through ONNX Runtime with the runner's thread settings (spinning only while a run lasts);
one row and `--rows` rows, the variants interleaved, medians. It shows what an 8-bit export can gain
per weight product on this processor: at one row the product reads its weights (bandwidth-bound, or
compute-bound where int8 dot products are slow, e.g. AVX2 without VNNI), at 16 rows it computes.

    python -m benchmarks.nbits_products [--hidden 576 --intermediate 3072 --pairs 8 --rows 16 --threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

NBITS_BLOCK = 32


def product_graph(hidden: int, intermediate: int, pairs: int, accuracy_level: int | None, seed: int = 0) -> bytes:
    """`pairs` x ([M, hidden] x [hidden, intermediate], then back to hidden); accuracy_level None: fp32 MatMul."""
    rng = np.random.default_rng(seed)
    nodes, weights, current = [], [], "x"
    for i in range(pairs):
        for j, (k, n) in enumerate(((hidden, intermediate), (intermediate, hidden))):
            name, out = f"w{i}_{j}", f"y{i}_{j}"
            if accuracy_level is None:
                weights.append(numpy_helper.from_array((rng.standard_normal((k, n)) * 0.02).astype(np.float32), name))
                nodes.append(helper.make_node("MatMul", [current, name], [out]))
            else:
                blocks = k // NBITS_BLOCK
                weights.append(numpy_helper.from_array(rng.integers(0, 256, (n, blocks, NBITS_BLOCK), dtype=np.uint8), name))
                weights.append(numpy_helper.from_array((rng.random(n * blocks) * 1e-3).astype(np.float32), f"{name}_scale"))
                nodes.append(helper.make_node("MatMulNBits", [current, name, f"{name}_scale"], [out], domain="com.microsoft",
                                              K=k, N=n, bits=8, block_size=NBITS_BLOCK, accuracy_level=accuracy_level))
            current = out
    graph = helper.make_graph(nodes, "products", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", hidden])],
                              [helper.make_tensor_value_info(current, TensorProto.FLOAT, ["M", hidden])], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    return model.SerializeToString()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.nbits_products", description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--intermediate", type=int, default=3072)
    p.add_argument("--pairs", type=int, default=8)
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=30)
    args = p.parse_args(argv)
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "1")
    options.add_session_config_entry("session.force_spinning_stop", "1")
    variants = {"fp32 MatMul": (None, 4.0), "8-bit, accuracy level 4 (int8)": (4, 1 + 4 / NBITS_BLOCK),
                "8-bit, accuracy level 1 (fp32)": (1, 1 + 4 / NBITS_BLOCK)}
    sessions = {name: ort.InferenceSession(product_graph(args.hidden, args.intermediate, args.pairs, level), options,
                                           providers=["CPUExecutionProvider"]) for name, (level, _) in variants.items()}
    weights = 2 * args.pairs * args.hidden * args.intermediate
    print(f"{2 * args.pairs} products of {args.hidden} x {args.intermediate}, {args.threads} threads, "
          f"median of {args.repeats}, variants interleaved")
    print(f"{'rows':>4} {'variant':<32} {'ms':>8} {'weights GB/s':>13} {'GFLOP/s':>8}")
    for rows in (1, args.rows):
        x = np.random.default_rng(1).standard_normal((rows, args.hidden)).astype(np.float32)
        times: dict[str, list[float]] = {name: [] for name in sessions}
        for session in sessions.values():
            session.run(None, {"x": x})
        for _ in range(args.repeats):
            for name, session in sessions.items():
                start = time.perf_counter()
                session.run(None, {"x": x})
                times[name].append(time.perf_counter() - start)
        for name, (_, bytes_per_weight) in variants.items():
            median = statistics.median(times[name])
            print(f"{rows:>4} {name:<32} {median * 1e3:8.2f} {weights * bytes_per_weight / median / 1e9:13.1f} "
                  f"{2 * rows * weights / median / 1e9:8.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

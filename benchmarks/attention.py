"""Time one step's attention alone: SmolLM2-135M's 30 layers (9 query heads, 3 kv heads of 64) of Lepton's
SlotAttention over float32 slots, SlotAttentionF16 over float16 slots or SlotAttentionI8 over 8-bit rows (D
codes and a scale), each layer with caches of its own (out of cache, as in a step), `--sequences` decodes each
over `--context` cached tokens, or with `--new-tokens N` a prompt of N tokens each (after `--context` cached
ones: 0 for a first prompt).

    python -m benchmarks.attention --sequences 16 --context 192
    python -m benchmarks.attention --sequences 1 --context 0 --new-tokens 512

Random queries, keys and values (only the speed is measured); 2 intra-op threads spinning at most 100 us, as
the runner computes; the kinds alternate `--rounds` times in one process, since this machine's speed
drifts. Prints the median and fastest time of the 30 layers for each kind and round.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

from lepton.native import DOMAIN, LIBRARY
from lepton.runners.slot_cache import SCALE_BYTES, quantize_rows

HEADS, KV_HEADS, DIM, LAYERS = 9, 3, 64, 30
KINDS = {"float32": ("SlotAttention", np.float32, TensorProto.FLOAT),
         "float16": ("SlotAttentionF16", np.float16, TensorProto.FLOAT16),
         "int8": ("SlotAttentionI8", np.uint8, TensorProto.UINT8)}  # NOTE: rows of D codes and a float32 scale


def row_width(kind: str) -> int:
    """The caches' last dimension: a row of DIM values, or DIM codes and 4 bytes of scale."""
    return DIM + SCALE_BYTES if kind == "int8" else DIM


def attention_session(kind: str, sequences: int, capacity: int, positions: int, threads: int, library: Path,
                      new_tokens: int = 1):
    op, _, cache_type = KINDS[kind]
    names = ["qkv", "past_key", "past_value", "seqlens_k", "total_sequence_length", "cos", "sin"]
    node = helper.make_node(op, names, ["out", "key", "value"], domain=DOMAIN, num_heads=HEADS,
                            kv_num_heads=KV_HEADS, scale=DIM ** -0.5)
    cache = [sequences, KV_HEADS, capacity, row_width(kind)]
    graph = helper.make_graph([node], "attention", [
        helper.make_tensor_value_info("qkv", TensorProto.FLOAT, [sequences, new_tokens, (HEADS + 2 * KV_HEADS) * DIM]),
        helper.make_tensor_value_info("past_key", cache_type, cache),
        helper.make_tensor_value_info("past_value", cache_type, cache),
        helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [sequences]),
        helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, []),
        helper.make_tensor_value_info("cos", TensorProto.FLOAT, [positions, DIM // 2]),
        helper.make_tensor_value_info("sin", TensorProto.FLOAT, [positions, DIM // 2]),
    ], [helper.make_tensor_value_info("out", TensorProto.FLOAT, None),
        helper.make_tensor_value_info("key", cache_type, cache), helper.make_tensor_value_info("value", cache_type, cache)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.spin_duration_us", "100")
    options.register_custom_ops_library(str(library))
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def layer_bindings(session, kind: str, sequences: int, context: int, capacity: int, rng, new_tokens: int = 1) -> list:
    """One binding a layer: the step's inputs and that layer's caches, bound in place."""
    dtype = KINDS[kind][1]
    angles = rng.uniform(-3, 3, (capacity, DIM // 2))
    inputs = {"qkv": rng.standard_normal((sequences, new_tokens, (HEADS + 2 * KV_HEADS) * DIM)).astype(np.float32),
              "seqlens_k": np.full(sequences, context + new_tokens - 1, np.int32),  # NOTE: context cached + this step's
              "total_sequence_length": np.array(context + new_tokens, np.int32),
              "cos": np.cos(angles).astype(np.float32), "sin": np.sin(angles).astype(np.float32)}
    bindings = []
    for _ in range(LAYERS):
        binding = session.io_binding()
        for name, array in inputs.items():
            binding.bind_cpu_input(name, array)
        for kv in ("key", "value"):
            rows = rng.standard_normal((sequences, KV_HEADS, capacity, DIM)).astype(np.float32)
            value = ort.OrtValue.ortvalue_from_numpy(quantize_rows(rows) if kind == "int8" else rows.astype(dtype))
            binding.bind_ortvalue_input(f"past_{kv}", value)
            binding.bind_ortvalue_output(kv, value)
        binding.bind_output("out")
        bindings.append(binding)
    return bindings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.attention", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sequences", type=int, default=16, help="decoding sequences")
    parser.add_argument("--context", type=int, default=192, help="tokens cached before the step, per sequence")
    parser.add_argument("--new-tokens", type=int, default=1,
                        help="tokens of each sequence in the step (1: decodes; more: a prompt, or a chunk after "
                             "--context cached tokens)")
    parser.add_argument("--repeats", type=int, default=10, help="timed steps per kind and round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--library", type=Path, default=LIBRARY, help="the operators' library (another build to compare)")
    args = parser.parse_args(argv)
    if not args.library.is_file():
        sys.exit(f"benchmarks.attention: {args.library} is not built (scripts/build_native.sh)")
    capacity = -(-(args.context + args.new_tokens) // 256) * 256
    rng = np.random.default_rng(0)
    runs = {kind: (session := attention_session(kind, args.sequences, capacity, capacity, args.threads, args.library,
                                                args.new_tokens),
                   layer_bindings(session, kind, args.sequences, args.context, capacity, rng, args.new_tokens))
            for kind in KINDS}
    for round_ in range(1, args.rounds + 1):
        for kind, (session, bindings) in runs.items():
            times = []
            for repeat in range(args.repeats + 1):
                started = time.perf_counter()
                for binding in bindings:
                    session.run_with_iobinding(binding)
                if repeat:  # NOTE: the first step warms up
                    times.append((time.perf_counter() - started) * 1e3)
            what = "decodes" if args.new_tokens == 1 else f"x {args.new_tokens} new tokens"
            print(f"round {round_}, {kind} slots: {LAYERS} layers of {args.sequences} {what} over {args.context} tokens "
                  f"{statistics.median(times):.2f} ms (min {min(times):.2f})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

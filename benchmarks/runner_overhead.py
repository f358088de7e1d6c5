"""The per-step Python work around a graph run, each piece timed the old way and the current way.

What a profile of the served engine thread showed outside the graph run (docs/performance.md,
"The serving loop and the Python around a step"): writing a step's K/V into the pools layer by
layer, wrapping every bound output to read the logits, and torch's NaN check and argmax over the
logits. Each row times both ways in this one process, on arrays of the given model's shape.

    python -m benchmarks.runner_overhead --model-dir build/onnx/smollm2
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from lepton.config import EngineConfig
from lepton.runners.slot_runner import SlotRunner


def _ms(fn, repeats: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1e3


def kv_write(layers: int, kv_heads: int, head_dim: int, tokens: int, repeats: int) -> tuple[float, float]:
    """One kind (keys) of a step's K/V read from the slots and written into the pools: per layer / at once."""
    block_size, blocks, context = 16, 2048, 192
    pools = np.zeros((layers, blocks, block_size, kv_heads, head_dim), np.float32)
    slots = np.random.default_rng(0).random((layers, 24, kv_heads, 512, head_dim), np.float32)
    rows, positions = np.arange(tokens), np.full(tokens, context - 1)
    targets = np.arange(tokens) * 100 + 7

    def per_layer():
        new = np.empty((layers, tokens, kv_heads, head_dim), np.float32)
        for layer in range(layers):
            new[layer] = slots[layer][rows, :, positions, :]
            pools[layer].reshape(-1, kv_heads, head_dim)[targets] = new[layer]
        return new

    def at_once():
        new = np.empty((layers, tokens, kv_heads, head_dim), np.float32)
        new[:] = slots[:, rows, :, positions, :].transpose(1, 0, 2, 3)
        pools.reshape(layers, -1, kv_heads, head_dim)[:, targets] = new
        return new

    if not np.array_equal(per_layer(), at_once()):
        raise AssertionError("the two ways wrote different K/V")
    return _ms(per_layer, repeats), _ms(at_once, repeats)


def logits_read(model_dir: Path, repeats: int) -> tuple[float, float]:
    """After a one-decode graph run: get_outputs()[0].numpy() / binding the logits to a numpy buffer."""
    config = EngineConfig.from_parameters({"model_dir": str(model_dir), "runner": "onnxruntime", "num_threads": "1"})
    runner = SlotRunner(model_dir, config)
    runner.slots.reserve(["a"], 256)
    binding = runner._binding(0, 1).io
    for name, array in (("input_ids", np.array([[1]], np.int64)), ("seqlens_k", np.array([9], np.int32)),
                        ("total_sequence_length", np.array(10, np.int32)),
                        ("logits_indices", np.array([0], np.int64))):
        binding.bind_cpu_input(name, array)
    if runner.pools_in_graph:  # NOTE: the step's K/V go into no pool row
        binding.bind_cpu_input("pool_rows", np.array([-1], np.int64))
    if runner.draft_head:  # NOTE: the head itself, as a sampled step reads it
        binding.bind_cpu_input("argmax_only", np.array(False))
    binding.bind_output("logits", "cpu")
    runner.session.run_with_iobinding(binding)
    wrapped = _ms(lambda: binding.get_outputs()[0].numpy(), repeats)
    out = np.empty((1, runner.model_config.vocab_size), np.float32)
    bound = _ms(lambda: binding.bind_output("logits", "cpu", 0, out.dtype, list(out.shape), out.ctypes.data), repeats)
    return wrapped, bound


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.runner_overhead", description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=Path("build/onnx/smollm2"))
    parser.add_argument("--repeats", type=int, default=300)
    args = parser.parse_args()
    torch.set_num_threads(1)  # NOTE: as the ONNX Runtime runner sets it
    from lepton.manifest import MANIFEST_FILE, Manifest

    cfg = Manifest.load(args.model_dir / MANIFEST_FILE).model_config
    print(f"{'piece':<58} {'before ms':>10} {'now ms':>10}")
    for tokens in (1, 16):
        before, now = kv_write(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, tokens, args.repeats)
        print(f"{f'K/V into the pools, {tokens} tokens, keys (values the same)':<58} {before:>10.3f} {now:>10.3f}")
    before, now = logits_read(args.model_dir, args.repeats)
    print(f"{'logits of a one-decode run (get_outputs / bound buffer)':<58} {before:>10.3f} {now:>10.3f}")
    for rows in (1, 16):
        logits = torch.randn(rows, cfg.vocab_size)
        nan_before = _ms(lambda: bool(torch.isnan(logits).any(dim=-1).any()), args.repeats)
        nan_now = _ms(lambda: bool(torch.isnan(logits.amax(dim=-1)).any()), args.repeats)
        arg_before = _ms(lambda: logits.argmax(dim=-1), args.repeats)
        arg_now = _ms(lambda: torch.from_numpy(logits.numpy().argmax(axis=-1)), args.repeats)
        print(f"{f'NaN check, {rows} rows (isnan().any() / isnan(amax))':<58} {nan_before:>10.3f} {nan_now:>10.3f}")
        print(f"{f'greedy argmax, {rows} rows (torch / numpy)':<58} {arg_before:>10.3f} {arg_now:>10.3f}")


if __name__ == "__main__":
    main()

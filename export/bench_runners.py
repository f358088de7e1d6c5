"""`python -m export.bench_runners`: decode-step latency of the ONNX Runtime vs PyTorch runners.

A batch of sequences decodes one token each over a cache of `--context` tokens; every runner
executes the same ModelInput, interleaved step by step so that load on a shared machine hits all
of them alike. Prints the median per runner, its ratio to torch float32, and each exporter's export time.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from lepton.manifest import MANIFEST_FILE, Manifest
from export.onnx_export import EXPORTERS, ExportOptions, export_onnx
from lepton.batch import ModelInput, build_model_input
from lepton.config import CacheConfig, EngineConfig, RunnerConfig
from lepton.model_folder import ModelFolder
from lepton.runners.onnx_runner import OnnxRunner
from lepton.runners.torch_runner import TorchRunner
from lepton.sampling_params import SamplingParams
from lepton.scheduler import ScheduledSeq, SchedulerOutput
from lepton.sequence import Sequence

DEMO_DIR = Path("build/models/demo")
SMOLLM_DIR = Path("build/models/smollm-shaped")
# NOTE: SmolLM-135M's shape with random weights; the demo tokenizer stands in (runners never read it).
SMOLLM_SHAPE = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, max_position_embeddings=2048,
                    tie_word_embeddings=True, initializer_range=0.02)


@dataclass(frozen=True)
class Timing:
    """Median step latency of one runner."""

    name: str
    median_ms: float


def build_smollm_shaped(out: Path, tokenizer_dir: Path) -> Path:
    """A random-weight model with SmolLM-135M's architecture numbers (built once, then reused)."""
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**SMOLLM_SHAPE)).save_pretrained(out, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy2(tokenizer_dir / name, out / name)
    return out


def decode_batch(batch_size: int, context: int, block_size: int) -> ModelInput:
    """batch_size sequences with `context` cached tokens, each computing one new token."""
    items, next_block = [], 0
    for row in range(batch_size):
        seq = Sequence(f"s{row}", [(row * 7 + i) % 1000 for i in range(context)], SamplingParams(), 1 << 30)
        seq.output_token_ids.append(3)
        num_blocks = -(-(context + 1) // block_size)
        table = list(range(next_block, next_block + num_blocks))
        next_block += num_blocks
        items.append(ScheduledSeq(seq, context, 1, table, True))
    return build_model_input(SchedulerOutput(items, batch_size), block_size)


def time_runners(runners: dict[str, object], batch: ModelInput, steps: int, warmup: int = 3) -> list[Timing]:
    """Median milliseconds per execute(), runners interleaved step by step."""
    samples: dict[str, list[float]] = {name: [] for name in runners}
    for step in range(warmup + steps):
        for name, runner in runners.items():
            started = time.perf_counter()
            runner.execute(batch)
            if step >= warmup:
                samples[name].append((time.perf_counter() - started) * 1e3)
    return [Timing(name, statistics.median(values)) for name, values in samples.items()]


def bench_model(model_dir: Path, args: argparse.Namespace) -> None:
    """Export with both exporters, then time torch fp32 / bf16 and both ONNX graphs on one batch."""
    block_size = args.block_size
    exports = {}
    for exporter in EXPORTERS:
        out = args.out / f"{model_dir.name}-{exporter}"
        exports[exporter] = out
        if args.reuse_exports and (out / MANIFEST_FILE).is_file():
            continue
        started = time.perf_counter()
        export_onnx(ExportOptions(model_dir, out, block_size, exporter=exporter, validate=args.validate))
        print(f"  export {exporter:<11} {time.perf_counter() - started:6.1f} s (validation {'on' if args.validate else 'off'})")
    folder = ModelFolder.open(model_dir)
    cfg = Manifest.load(exports["torchscript"] / MANIFEST_FILE).model_config
    blocks = args.batch * (-(-(args.context + 1) // block_size))
    per_block = 2 * cfg.num_layers * block_size * cfg.num_kv_heads * cfg.head_dim * 4
    runners = {
        "torch float32": TorchRunner(folder, _config(model_dir, block_size, blocks * per_block, "float32", args.threads)),
        "torch bfloat16": TorchRunner(folder, _config(model_dir, block_size, blocks * per_block // 2, "bfloat16", args.threads)),
    }
    for exporter, out in exports.items():
        runners[f"ort {exporter}"] = OnnxRunner(out, _config(out, block_size, blocks * per_block, "float32", args.threads))
    timings = time_runners(runners, decode_batch(args.batch, args.context, block_size), args.steps)
    base = timings[0].median_ms
    for timing in timings:
        print(f"  {timing.name:<16} {timing.median_ms:8.2f} ms/step   {timing.median_ms / base:5.2f}x torch float32")


def _config(model_dir: Path, block_size: int, memory: int, dtype: str, threads: int) -> EngineConfig:
    return EngineConfig(model_dir=model_dir, cache=CacheConfig(block_size=block_size, kv_cache_memory_bytes=memory),
                        runner=RunnerConfig(dtype=dtype, num_threads=threads))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export.bench_runners", description=__doc__)
    parser.add_argument("--models", default="demo,smollm", help="comma list of demo, smollm")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per runner")
    parser.add_argument("--batch", type=int, default=8, help="decoding sequences per step")
    parser.add_argument("--context", type=int, default=256, help="cached tokens per sequence")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads (0 = library default)")
    parser.add_argument("--validate", action="store_true", help="also validate each export (slower)")
    parser.add_argument("--reuse-exports", action="store_true", help="time steps of exports already in --out")
    parser.add_argument("--out", type=Path, default=Path("build/bench"), help="where exports are written")
    args = parser.parse_args(argv)
    if not (DEMO_DIR / "config.json").is_file():
        from export.demo_model import build_demo_model

        build_demo_model(DEMO_DIR)
    dirs = {"demo": lambda: DEMO_DIR, "smollm": lambda: build_smollm_shaped(SMOLLM_DIR, DEMO_DIR)}
    for name in args.models.split(","):
        print(f"[bench] {name}: batch {args.batch} decoding at {args.context} tokens of context, "
              f"median of {args.steps} steps")
        bench_model(dirs[name](), args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

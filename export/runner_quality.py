"""Quality of a runner setting that is not an export: the torch runner computing in bfloat16, and ONNX
Runtime serving a float32 export with its weight products in bfloat16 (weight_dtype=bfloat16).

torch: a model folder served by the torch runner in bfloat16 (weights, activations and K/V cache);
onnxruntime: the float32 export with its products rewritten to Lepton's MatMulBF16 (weights and each
product's activations rounded to bfloat16), served as the runner serves it: the keys and values attention
reads in float16 slots (RunnerConfig.kv_cache_dtype auto), everything else float32. Either is
compared with the model's float32 ONNX export on the same held-out windows as `export.quality` (teacher
forced: the first half of every window prefilled in one step, the rest decoded one token per step), and
judged by the same kind of gate. The report (`build/quality/<folder>-<runner>-bfloat16.json`) names the
files and code it was computed from; `lepton.autoselect` offers the setting only while that report matches
and passed its gate.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from export.quality import (
    EvalOptions, QualityGate, VariantQuality, format_table, gate_failures, logit_metrics, sized_runner,
    teacher_forced_inputs,
)
from export.training import held_out_windows
from lepton.autoselect import cpu_features, fingerprint, has_bf16_compute, report_path
from lepton.config import CacheConfig, EngineConfig, RunnerConfig
from lepton.manifest import MANIFEST_FILE, Manifest
from lepton.runners.bf16_graph import unavailable as bf16_unavailable

# NOTE: the int8 / q4_1 limits (export.quality.GATES). Measured on SmolLM2-135M-Instruct (2,040 predictions,
# 8 windows): KL 0.0013, p99 0.0058, top-1 0.974, perplexity x0.9997 - it passes with ~1.5x margin on KL.
GATES = {
    "bfloat16": QualityGate(min_top1_agreement=0.94, max_kl_mean=0.002, max_kl_p99=0.015, max_perplexity_ratio=1.01,
                            max_abs_logit_error=2.0),
}


def evaluate_runner(model_dir: Path, reference_dir: Path, dtype: str, options: EvalOptions) -> VariantQuality:
    """The torch runner at dtype on model_dir against reference_dir (float32 export of the same weights)."""
    from lepton.runners.torch_runner import TorchRunner
    from lepton.model_folder import ModelFolder

    reference = Manifest.load(Path(reference_dir) / MANIFEST_FILE)
    if Path(reference.source.path).resolve() != Path(model_dir).resolve():
        raise ValueError(f"{reference_dir} is an export of {reference.source.path}, not of {model_dir}")

    def torch_runner(num_blocks: int):
        bytes_per_block = 2 * reference.model_config.num_layers * reference.block_size
        bytes_per_block *= reference.model_config.num_kv_heads * reference.model_config.head_dim * (2 if dtype == "bfloat16" else 4)
        config = EngineConfig(model_dir=Path(model_dir), cache=CacheConfig(reference.block_size, num_blocks * bytes_per_block),
                              runner=RunnerConfig(runner="torch", dtype=dtype, num_threads=options.num_threads))
        return TorchRunner(ModelFolder.open(model_dir), config)

    return _judged(reference_dir, dtype, options, torch_runner, f"torch {dtype}", model_dir, f"torch-{dtype}")


def evaluate_onnxruntime(export_dir: Path, dtype: str, options: EvalOptions) -> VariantQuality:
    """The float32 export with weight_dtype=dtype against itself as exported."""
    reference = Manifest.load(Path(export_dir) / MANIFEST_FILE)
    if reference.quantization is not None:
        raise ValueError(f"{export_dir} is a {reference.quantization.method} export, not a float32 one")
    return _judged(export_dir, dtype, options,
                   lambda num_blocks: sized_runner(export_dir, num_blocks, options.num_threads, weight_dtype=dtype),
                   f"onnxruntime {dtype} weights", export_dir, f"onnxruntime-weights-{dtype}")


def _judged(reference_dir: Path, dtype: str, options: EvalOptions, make_runner, name: str, folder: Path,
            preset: str) -> VariantQuality:
    """make_runner(num_blocks)'s logits against the float32 export's on the held-out windows, and the gate."""
    reference = Manifest.load(Path(reference_dir) / MANIFEST_FILE)
    windows = held_out_windows(Path(reference_dir) / "tokenizer.json", options.num_windows, options.window_len)
    inputs = teacher_forced_inputs(windows, reference.block_size)
    num_blocks = options.num_windows * -(-options.window_len // reference.block_size)
    ref_logits, ref_ms = _window_logits(sized_runner(reference_dir, num_blocks, options.num_threads).execute,
                                        inputs, windows.shape)
    logits, step_ms = _window_logits(make_runner(num_blocks).execute, inputs, windows.shape)
    report = VariantQuality(
        name=name, export_dir=str(Path(folder).resolve()), reference_dir=str(reference_dir), preset=preset,
        max_abs_logit_error=float(np.abs(ref_logits - logits).max()), max_abs_kv_error=0.0, step_ms=step_ms,
        reference_step_ms=ref_ms, gate=GATES.get(dtype), failures=(), **logit_metrics(ref_logits, logits, windows))
    return VariantQuality(**{**asdict(report), "gate": report.gate, "failures": gate_failures(report, report.gate)})


def _window_logits(execute, inputs, shape: tuple[int, int]) -> tuple[np.ndarray, float]:
    """Logits of every window position, and the median decode step in ms."""
    num_windows, length = shape
    logits, decode_ms = None, []
    for step, batch in enumerate(inputs):
        started = time.perf_counter()
        out = execute(batch).float().numpy()
        if step == 0:
            logits = np.empty((num_windows, length, out.shape[-1]), np.float32)
            logits[:, : length // 2] = out.reshape(num_windows, length // 2, -1)
        else:
            decode_ms.append((time.perf_counter() - started) * 1e3)
            logits[:, length // 2 + step - 1] = out
    return logits, statistics.median(decode_ms)


def write(report: VariantQuality, model_dir: Path, path: Path, options: EvalOptions, runner: str = "torch") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"model_dir": str(Path(model_dir).resolve()), "fingerprint": fingerprint(model_dir, runner),
            "evaluation": asdict(options), "variants": [asdict(report) | {"passed": report.passed}]}
    path.write_text(json.dumps(data, indent=2) + "\n")
    path.with_suffix(".md").write_text(format_table([report]) + "\n\nstep ms: decode steps of the evaluation "
                                       "itself (8-16 windows decoding), not interleaved\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export.runner_quality", description=__doc__,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--runner", default="torch", choices=("torch", "onnxruntime"),
                        help="torch: --model in bfloat16; onnxruntime: the --reference export's products in bfloat16")
    parser.add_argument("--model", type=Path, default=None, help="torch: the model folder the torch runner serves")
    parser.add_argument("--reference", type=Path, required=True, help="its float32 export (python -m export onnx)")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(GATES))
    parser.add_argument("--windows", type=int, default=8, help="held-out windows of 256 tokens")
    parser.add_argument("--out", type=Path, default=None,
                        help="default: build/quality/<model>-torch-<dtype>.json or <reference>-onnxruntime-<dtype>.json")
    parser.add_argument("--if-supported", action="store_true",
                        help="do nothing (exit 0) on a processor without bfloat16 compute (onnxruntime: AVX512-BF16 or AVX2 + FMA, "
                             "or without lepton/native built)")
    args = parser.parse_args(argv)
    if args.runner == "torch" and args.model is None:
        parser.error("--model: required with --runner torch")
    cpu = cpu_features()
    if args.if_supported and not (has_bf16_compute(cpu) if args.runner == "torch" else not bf16_unavailable(cpu)):
        print(f"[quality] {args.runner} {args.dtype}: this processor (or build) cannot compute it fast; skipped")
        return 0
    folder = args.model if args.runner == "torch" else args.reference
    out = args.out or report_path(folder, args.runner, args.dtype)
    if out.is_file() and json.loads(out.read_text()).get("fingerprint") == fingerprint(folder, args.runner):
        print(f"[quality] {out} is up to date")
        return 0
    options = EvalOptions(num_windows=args.windows)
    if args.runner == "torch":
        report = evaluate_runner(args.model, args.reference, args.dtype, options)
    else:
        report = evaluate_onnxruntime(args.reference, args.dtype, options)
    write(report, folder, out, options, args.runner)
    print(format_table([report]))
    print(f"[quality] {args.runner} {args.dtype}: {'passed' if report.passed else 'FAILED: ' + '; '.join(report.failures)} "
          f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

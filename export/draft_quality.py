"""How often the draft head's argmax equals the head's own, through the runner, on held-out text.

A greedy step without logprobs or penalties reads only each row's argmax, and the slot runner then picks the
head's candidates with a 4-bit draft of it (lepton/runners/draft_head.py). The same teacher-forced windows as
`export.quality` (the first half of every window prefilled, the rest decoded a token a step) run twice through
one runner as the engine serves the export: every row's full logits, then the argmax-only steps; at each
position the two argmaxes are compared. Prints the counts and, with --out, writes them as JSON.

    python -m export.draft_quality --export build/onnx/smollm2-q8_0
    python -m export.draft_quality --export build/onnx/smollm2 --weight-dtype bfloat16
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from export.quality import EvalOptions, sized_runner, teacher_forced_inputs, window_logits
from export.training import held_out_windows
from lepton.manifest import MANIFEST_FILE, Manifest


def draft_agreement(export_dir: Path, options: EvalOptions, weight_dtype: str = "export") -> dict:
    """{"positions", "disagreements", "agreement"} of the draft's argmax against the head's over the windows;
    ValueError when the runner serves this export without a draft head."""
    manifest = Manifest.load(Path(export_dir) / MANIFEST_FILE)
    windows = held_out_windows(Path(export_dir) / "tokenizer.json", options.num_windows, options.window_len)
    inputs = teacher_forced_inputs(windows, manifest.block_size)
    num_blocks = options.num_windows * -(-options.window_len // manifest.block_size)
    runner = sized_runner(Path(export_dir), num_blocks, options.num_threads, weight_dtype)
    if not getattr(runner, "draft_head", False):
        raise ValueError(f"{export_dir} (weight_dtype={weight_dtype}) is served without a draft head on this "
                         f"processor (the runner printed why)")
    full = window_logits(runner, inputs, windows.shape).argmax(axis=-1)
    runner.clear()
    draft = window_logits(runner, [dataclasses.replace(b, argmax_only=True) for b in inputs], windows.shape)
    disagreements = int((draft.argmax(axis=-1) != full).sum())
    return {"export": str(export_dir), "weight_dtype": weight_dtype, "positions": int(full.size),
            "disagreements": disagreements, "agreement": 1 - disagreements / full.size}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export.draft_quality", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--export", type=Path, required=True, help="an export folder (python -m export onnx / quantize)")
    parser.add_argument("--weight-dtype", default="export", choices=("export", "bfloat16"),
                        help="RunnerConfig.weight_dtype the runner serves it with")
    parser.add_argument("--windows", type=int, default=EvalOptions.num_windows, help="held-out windows")
    parser.add_argument("--window-len", type=int, default=EvalOptions.window_len, help="tokens a window")
    parser.add_argument("--out", type=Path, default=None, help="also write the counts to this JSON file")
    args = parser.parse_args(argv)
    options = EvalOptions(num_windows=args.windows, window_len=args.window_len)
    try:
        result = draft_agreement(args.export, options, args.weight_dtype)
    except ValueError as exc:
        print(f"[draft] {exc}", file=sys.stderr)
        return 1
    print(f"[draft] {result['export']} (weight_dtype={args.weight_dtype}): the draft's argmax equals the head's at "
          f"{result['positions'] - result['disagreements']:,} of {result['positions']:,} positions "
          f"({result['agreement']:.5f})")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

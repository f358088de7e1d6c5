"""`python -m export`: build models and artifacts into build/."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="build the demo Llama model (seeded weights, local tokenizer)")
    demo.add_argument("--out", type=Path, default=Path("build/models/demo"), help="output folder")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from export.demo_model import build_demo_model

        out = build_demo_model(args.out)
        print(f"[demo] wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

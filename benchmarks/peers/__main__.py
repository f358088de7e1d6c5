"""Lepton vs llama.cpp's server and onnxruntime-genai: same model, same workloads, one sitting.

    bash scripts/build_peers.sh                      # the peers, into build/peers/ (once)
    .venv/bin/python -m benchmarks.peers             # full run: docs/benchmarks.md, build/reports/peers/
    .venv/bin/python -m benchmarks.peers --quick     # smoke run: everything under build/reports/peers/quick/
    .venv/bin/python -m benchmarks.peers --peers lepton,llamacpp --lepton-variants ort-int8 --workloads w1,w2
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import sys
from pathlib import Path

import tokenizers

from benchmarks.machine import machine_info
from benchmarks.model import build_model
from benchmarks.peers import artifacts, probe, ratios, report
from benchmarks.peers.systems import Context, System, run_system
from benchmarks.peers.workloads import NAMES, QUICK, WorkloadOptions, build_workloads, token_ids
from benchmarks.workload import PromptFactory
from lepton.autoselect import cpu_features, has_bf16_compute
from lepton.server import PROJECT_ROOT

REPORT_DIR = PROJECT_ROOT / "build" / "reports" / "peers"
REAL_MODEL = PROJECT_ROOT / "build" / "models" / "smollm2-135m-instruct"
SEEDED_MODEL = PROJECT_ROOT / "build" / "models" / "smollm-shape"
VARIANTS = {"llamacpp": ("f32", "bf16", "q8_0", "q4_0"), "ortgenai": ("fp32", "int4"),
            "lepton": ("torch-fp32", "torch-bf16", "ort-fp32", "ort-bf16", "ort-int8", "ort-int4", "ort-q4_1",
                       "ort-q8_0")}


def _names(allowed: tuple[str, ...]):
    def parse(text: str) -> list[str]:
        names = [n.strip() for n in text.split(",") if n.strip()]
        unknown = [n for n in names if n not in allowed]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {unknown}; choose from {', '.join(allowed)}")
        return names
    return parse


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.peers", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny request counts; outputs under build/reports/peers/quick/")
    p.add_argument("--model-dir", type=Path, help=f"default: {REAL_MODEL.name} when built, else the seeded "
                   f"{SEEDED_MODEL.name} (built here from build/models/demo's tokenizer)")
    p.add_argument("--peers", type=_names(tuple(VARIANTS)), default=list(VARIANTS), help="comma-separated")
    for peer, variants in VARIANTS.items():
        p.add_argument(f"--{peer}-variants", type=_names(variants), default=argparse.SUPPRESS,
                       help="comma-separated (default: " + ",".join(v for v in variants if v not in NAMED_ONLY)
                            + ("; torch-bf16 only where the processor has bfloat16 products, AVX512-BF16 or AMX, "
                               "unless named here; ort-int8 and ort-int4 only when named here)"
                               if peer == "lepton" else ")"))
    p.add_argument("--workloads", type=_names(NAMES), default=list(NAMES), help="comma-separated")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="compute threads of llama.cpp and ort-genai")
    p.add_argument("--lepton-param", action="append", default=[], metavar="KEY=VALUE",
                   help="Lepton engine parameter for every variant (repeatable), e.g. num_threads=2")
    p.add_argument("--json", type=Path, help="default: build/reports/peers/peers.json")
    p.add_argument("--doc", type=Path, help="default: docs/benchmarks.md")
    p.add_argument("--img-dir", type=Path, help="default: docs/img (files peers_*.png)")
    p.add_argument("--from-json", type=Path, metavar="JSON", help="measure nothing: redraw report and plots")
    args = p.parse_args(argv)
    args.skipped = default_variants(args, cpu_features())
    out = REPORT_DIR / "quick" if args.quick else None
    args.json = args.json or (out or REPORT_DIR) / "peers.json"
    args.doc = args.doc or (out / "benchmarks-peers.md" if out else PROJECT_ROOT / "docs" / "benchmarks.md")
    args.img_dir = args.img_dir or (out / "img" if out else PROJECT_ROOT / "docs" / "img")
    return args


# NOTE: ONNX Runtime's own int8 / int4 products (export quantize --method int8 / int4) miss the quality gate on
# SmolLM2-135M-Instruct (max |logit err| 31.4 > 2 and 17.7 > 3 in docs/benchmarks.md of 2026-12-07): make serve never
# serves them and no ratio counts them, and exporting and running them took ~25 minutes of an AVX2 sitting.
NAMED_ONLY = ("ort-int8", "ort-int4")


def default_variants(args: argparse.Namespace, cpu: dict) -> list[str]:
    """Fill the variant lists not given on the command line with every variant of the peer, but Lepton's
    ort-int8 and ort-int4 (NAMED_ONLY), and its torch-bf16 where the processor has no bfloat16 products (torch
    emulates them: on an AVX2-only EPYC its W1 ITL was 68.6 ms and W2 13.2 tok/s, its workloads most of an
    hour; make serve never offers it there, lepton.autoselect). Returns why each left-out variant was left out,
    for the report."""
    skipped = []
    for peer, variants in VARIANTS.items():
        attr = f"{peer}_variants"
        if getattr(args, attr, None) is not None:
            continue
        chosen = list(variants)
        if peer == "lepton":
            chosen = [v for v in chosen if v not in NAMED_ONLY]
            skipped.append("Lepton ONNX Runtime int8 and int4 (ONNX Runtime's own products): they miss the "
                           "quantization quality gate on SmolLM2-135M-Instruct, so make serve never serves them and "
                           "no ratio counts them; `--lepton-variants ort-int8,ort-int4` runs them")
            if not has_bf16_compute(cpu):
                chosen.remove("torch-bf16")
                skipped.append("Lepton torch bf16: no AVX512-BF16 / AMX on this processor, torch would emulate "
                               "bfloat16 (make serve never offers it here); `--lepton-variants torch-bf16` runs it")
        setattr(args, attr, chosen)
    return skipped


def choose_model(args) -> tuple[Path, str]:
    """The real SmolLM2-135M-Instruct when built (make smollm2), else the seeded model of its shape."""
    if args.model_dir:
        return args.model_dir.resolve(), "given with --model-dir"
    if (REAL_MODEL / "config.json").is_file():
        return REAL_MODEL, "SmolLM2-135M-Instruct (`make smollm2`)"
    build_model(SEEDED_MODEL, PROJECT_ROOT / "build" / "models" / "demo")
    return SEEDED_MODEL, ("SmolLM-135M shape with seeded random weights and the demo tokenizer "
                          "(`benchmarks.model`; SmolLM2-135M-Instruct was not built)")


def num_params(model_dir: Path) -> int:
    """Parameters in the safetensors files (a tied embedding counts once)."""
    from math import prod

    total = 0
    for file in model_dir.glob("*.safetensors"):
        with open(file, "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        total += sum(prod(v["shape"]) for k, v in header.items() if k != "__metadata__")
    return total


def log(message: str) -> None:
    print(f"{datetime.datetime.now():%H:%M:%S} {message}", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.from_json:
        return write_outputs(args, json.loads(args.from_json.read_text()), write_json=False)
    command = " ".join(shlex.quote(w) for w in ["python", "-m", "benchmarks.peers",
                                                 *(sys.argv[1:] if argv is None else argv)])
    started = datetime.datetime.now().astimezone()
    model_dir, description = choose_model(args)
    factory = PromptFactory(tokenizers.Tokenizer.from_file(str(model_dir / "tokenizer.json")), 0)
    workloads = {k: w for k, w in build_workloads(factory, QUICK if args.quick else WorkloadOptions()).items()
                 if k in args.workloads}
    ids = {s.request_id: token_ids(factory, s) for w in workloads.values() for s in (*w.warmup, *w.specs)}
    machine = machine_info()
    log("probing the machine (bandwidth, GEMM rates)")
    measured = probe.probe()
    log(f"probe: {measured}")
    params = num_params(model_dir)
    systems = [System(peer, v) for peer in args.peers for v in getattr(args, f"{peer}_variants")]
    ctx = Context(model_dir, workloads, ids, args.threads, dict(kv.split("=", 1) for kv in args.lepton_param),
                  factory, log)
    result = {
        "command": command, "date": started.isoformat(timespec="seconds"), "machine": machine, "probe": measured,
        "model": {"dir": str(model_dir), "name": model_dir.name, "description": description, "num_params": params},
        "floors_ms": ratios.floors_ms(params, measured["read_bandwidth_gbps"]["all_threads"]),
        "num_threads": args.threads, "json": str(args.json.relative_to(PROJECT_ROOT) if args.json.is_relative_to(
            PROJECT_ROOT) else args.json),
        "skipped": args.skipped,
        "workloads": [{"name": w.name, "title": w.title, "num_requests": len(w.specs)} for w in workloads.values()],
        "systems": [],
    }
    for system in systems:
        log(f"=== {system.label}")
        result["systems"].append(run_system(system, ctx))
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1, default=str) + "\n")  # NOTE: partial results survive
    result["finished"] = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    result["machine"]["loadavg_at_end"] = os.getloadavg()
    result["peer_versions"] = peer_versions(result)
    result["commands"] = ["make bench-peers   # = the two lines below", "bash scripts/build_peers.sh", command]
    result["commands"] += ["# conversions (run by the benchmark when an artifact is missing):"]
    result["commands"] += artifacts.build_commands(model_dir)
    result["commands"] += ["# llama-server, per variant (the model file changes):"]
    result["commands"] += list(dict.fromkeys(c for s in result["systems"] for c in s.get("commands", [])))[:2]
    return write_outputs(args, result, write_json=True)


def peer_versions(result: dict) -> str:
    versions = {s.get("version") for s in result["systems"] if s["peer"] == "ortgenai" and s.get("version")}
    return (f"onnxruntime-genai {', '.join(sorted(versions)) or '(not run)'}; llama.cpp from llama-cpp-python 0.3.36's "
            "source package")


def write_outputs(args, result: dict, write_json: bool) -> int:
    """Ratios, JSON, plots and the markdown report of a result."""
    result["ratios"] = ratios.compute(result)
    if write_json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1, default=str) + "\n")
    images = report.plots(result, args.img_dir)
    text = report.markdown(result, images, args.doc.parent)
    args.doc.parent.mkdir(parents=True, exist_ok=True)
    args.doc.write_text(text)
    print(text)
    log(f"wrote {args.json if write_json else '(no JSON)'}, {args.doc}, {', '.join(map(str, images))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

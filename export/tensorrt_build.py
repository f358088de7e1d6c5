"""`python -m export tensorrt`: build a TensorRT plan from an export folder, profiles derived from its manifest."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import onnx

from export.onnx_export import COPIED_FILES
from export.tensorrt_precision import PRECISIONS, TypedGraph, typed_graph
from lepton.config import CacheConfig, SchedulerConfig
from lepton.errors import ModelFolderError
from lepton.manifest import MANIFEST_FILE, Manifest
from lepton.runners.tensorrt_runner import (
    ENGINE_FORMAT_VERSION, ENGINE_MANIFEST_FILE, PLAN_FILE, AxisRange, EngineManifest, TensorRTLibrary,
    TensorRTUnavailable, load_tensorrt, pool_blocks,
)

SERVING_FILES = (MANIFEST_FILE, *COPIED_FILES)
TYPED_GRAPH_FILE = "typed.onnx"


class TensorRTBuildError(RuntimeError):
    """TensorRT could not parse or build the graph, or the build was asked for something it cannot do."""


@dataclass(frozen=True)
class BuildOptions:
    """What `python -m export tensorrt` was asked to do; None limits are derived from the manifest."""

    export_dir: Path
    out_dir: Path
    precision: str = "fp32"
    max_tokens: int = SchedulerConfig().max_num_batched_tokens  # T: tokens in one step
    max_seqs: int = SchedulerConfig().max_num_seqs  # S and L: sequences in one step
    max_blocks_per_seq: int | None = None  # B; None = max_position_embeddings / block_size
    max_pool_blocks: int | None = None  # num_blocks; None = what the default kv_cache_memory_bytes holds
    compute_capabilities: tuple[str, ...] = ()  # TensorRT-RTX targets, upper case ("SM89"); () = its default
    tf32: bool = False  # let fp32 matrix products use TF32 (TensorRT's default; off keeps fp32 exact)


def axis_ranges(manifest: Manifest, options: BuildOptions) -> dict[str, AxisRange]:
    """min/opt/max of every dynamic axis the manifest declares; opt is a full decode step."""
    cfg = manifest.model_config
    max_seqs = min(options.max_seqs, options.max_tokens)
    max_blocks = options.max_blocks_per_seq
    if max_blocks is None:
        max_blocks = math.ceil(cfg.max_position_embeddings / manifest.block_size)
    max_pool = options.max_pool_blocks
    if max_pool is None:
        max_pool = pool_blocks(manifest, CacheConfig().kv_cache_memory_bytes)
    rules = {
        "T": AxisRange(1, max_seqs, options.max_tokens),
        "S": AxisRange(1, max_seqs, max_seqs),
        "Q": AxisRange(1, 1, min(options.max_tokens, cfg.max_position_embeddings)),
        "B": AxisRange(1, max_blocks, max_blocks),
        # NOTE: a step of partial prefill chunks samples nothing, so L may be 0.
        "L": AxisRange(0, max_seqs, max_seqs),
        "num_blocks": AxisRange(1, max_pool, max_pool),
    }
    unknown = sorted(set(manifest.dynamic_axes) - set(rules))
    if unknown:
        raise TensorRTBuildError(f"the manifest declares dynamic axes {unknown} that the TensorRT build cannot bound")
    for axis, bounds in rules.items():
        if not 1 <= bounds.max or not bounds.min <= bounds.opt <= bounds.max:
            raise TensorRTBuildError(f"axis {axis}: limits give min {bounds.min}, opt {bounds.opt}, max {bounds.max}")
    return {axis: rules[axis] for axis in manifest.dynamic_axes}


def input_shapes(manifest: Manifest, ranges: dict[str, AxisRange]) -> dict[str, tuple[tuple[int, ...], ...]]:
    """Each graph input's (min, opt, max) shape: dynamic axes from ranges, fixed axes as declared."""
    def shape(dims, pick) -> tuple[int, ...]:
        return tuple(pick(ranges[d]) if isinstance(d, str) else d for d in dims)

    return {spec.name: (shape(spec.shape, lambda r: r.min), shape(spec.shape, lambda r: r.opt),
                        shape(spec.shape, lambda r: r.max)) for spec in manifest.inputs}


def parse_network(library: TensorRTLibrary, builder, graph_file: Path, manifest: Manifest):
    """Parse graph_file into a strongly typed network; parser errors and name mismatches are errors."""
    trt = library.module
    # NOTE: strongly typed everywhere: TensorRT-RTX knows no other mode, and the precision lives in the graph.
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, library.logger)
    library.take_errors()
    if not parser.parse_from_file(str(graph_file)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)] or library.take_errors()
        raise TensorRTBuildError(f"{library.flavour} {library.version} cannot parse {graph_file}: {errors}")
    found = {network.get_input(i).name for i in range(network.num_inputs)}
    found |= {network.get_output(i).name for i in range(network.num_outputs)}
    expected = {spec.name for spec in manifest.inputs + manifest.outputs}
    if found != expected:
        raise TensorRTBuildError(f"{graph_file}: network names {sorted(found ^ expected)} disagree with the manifest")
    return network, parser


def build_plan(library: TensorRTLibrary, graph: TypedGraph, graph_file: Path, manifest: Manifest,
               ranges: dict[str, AxisRange], options: BuildOptions) -> bytes:
    """Parse and build; a refusal names the precision, the flavour and TensorRT's own reason."""
    trt = library.module
    try:
        builder = trt.Builder(library.logger)
    except (TypeError, RuntimeError) as exc:  # NOTE: pybind11 raises TypeError when TensorRT returns no builder
        raise TensorRTUnavailable(f"{library.flavour} {library.version} cannot create a builder ({exc}): "
                                  f"{library.take_errors()}; TensorRT proper needs a GPU to build") from None
    network, _parser = parse_network(library, builder, graph_file, manifest)
    config = builder.create_builder_config()
    if not options.tf32:
        config.clear_flag(trt.BuilderFlag.TF32)
    set_targets(library, config, options.compute_capabilities)
    profile = builder.create_optimization_profile()
    for name, (low, opt, high) in input_shapes(manifest, ranges).items():
        profile.set_shape(name, low, opt, high)
    config.add_optimization_profile(profile)
    library.take_errors()
    plan = builder.build_serialized_network(network, config)
    if plan is None or plan.nbytes == 0:
        targets = ", ".join(options.compute_capabilities) or "default targets"
        raise TensorRTBuildError(f"{library.flavour} {library.version} refused to build the {graph.precision} "
                                 f"engine for {targets}: {' | '.join(library.take_errors()) or 'no reason logged'}")
    return bytes(plan)


def set_targets(library: TensorRTLibrary, config, capabilities: tuple[str, ...]) -> None:
    """TensorRT-RTX builds for named compute capabilities; TensorRT proper only for the GPU it runs on."""
    if not capabilities:
        return
    trt = library.module
    if not hasattr(config, "set_compute_capability"):
        raise TensorRTBuildError(f"{library.flavour} {library.version} builds for the GPU it runs on; "
                                 f"--compute-capability {' '.join(capabilities)} needs TensorRT-RTX")
    known = [name for name in trt.ComputeCapability.__members__ if name.startswith("SM")]
    unknown = [c for c in capabilities if c not in known]
    if unknown:
        raise TensorRTBuildError(f"compute capabilities {unknown} unknown to {library.flavour} {library.version}; "
                                 f"known: {', '.join(known)}")
    config.num_compute_capabilities = len(capabilities)
    for index, name in enumerate(capabilities):
        config.set_compute_capability(trt.ComputeCapability.__members__[name], index)


def build_engine(options: BuildOptions) -> EngineManifest:
    """Build the plan and write the engine folder; the folder appears only if the build succeeded."""
    library = load_tensorrt()
    manifest = Manifest.load(options.export_dir / MANIFEST_FILE)
    if manifest.quantization is not None:
        raise TensorRTBuildError(f"{options.export_dir} is an ONNX Runtime quantized export; TensorRT builds from "
                                 "the float32 export and quantizes itself: pass that with --precision int8")
    ranges = axis_ranges(manifest, options)
    staging = options.out_dir.with_name(options.out_dir.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        started = time.monotonic()
        graph, graph_file = prepare_graph(options, manifest, staging)
        graph_seconds = time.monotonic() - started
        plan = build_plan(library, graph, graph_file, manifest, ranges, options)
        build_seconds = time.monotonic() - started - graph_seconds
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if graph_file.parent == staging:
        graph_file.unlink()
        graph_file.with_name(graph_file.name + ".data").unlink(missing_ok=True)
    (staging / PLAN_FILE).write_bytes(plan)
    for name in SERVING_FILES:
        if (options.export_dir / name).is_file():
            shutil.copy2(options.export_dir / name, staging / name)
    engine = EngineManifest(
        format_version=ENGINE_FORMAT_VERSION, flavour=library.flavour, tensorrt_version=library.version,
        precision=graph.precision, plan_file=PLAN_FILE, plan_bytes=len(plan), profiles=(ranges,),
        compute_capabilities=options.compute_capabilities, tf32=options.tf32,
        num_linear_layers=graph.num_linear_layers,
        calibration=dataclasses.asdict(graph.calibration) if graph.calibration else None,
        source_export=str(options.export_dir),
        source_manifest_sha256=hashlib.sha256((options.export_dir / MANIFEST_FILE).read_bytes()).hexdigest(),
        graph_seconds=round(graph_seconds, 3), build_seconds=round(build_seconds, 3),
    )
    engine.save(staging / ENGINE_MANIFEST_FILE)
    shutil.rmtree(options.out_dir, ignore_errors=True)
    staging.rename(options.out_dir)
    return engine


def prepare_graph(options: BuildOptions, manifest: Manifest, staging: Path) -> tuple[TypedGraph, Path]:
    """The graph to parse: the export's own file for fp32, else a typed copy written into staging."""
    source = options.export_dir / manifest.model_file
    if options.precision == "fp32":
        return TypedGraph(None, "fp32", 0, None), source
    graph = typed_graph(onnx.load(str(source)), options.precision, manifest, options.export_dir)
    target = staging / TYPED_GRAPH_FILE
    onnx.save_model(graph.model, str(target), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=TYPED_GRAPH_FILE + ".data", size_threshold=1024)
    return graph, target


def add_parser(subparsers) -> None:
    """Register the `tensorrt` subcommand; its handler is args.handler."""
    parser = subparsers.add_parser("tensorrt", help="build a TensorRT plan from an export folder")
    parser.add_argument("--export", type=Path, required=True, help="export folder (python -m export onnx)")
    parser.add_argument("--out", type=Path, required=True, help="engine folder to write, e.g. build/trt/demo")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32",
                        help="linear layers' precision (int8/fp8: Q/DQ, calibrated on the CPU); default fp32")
    parser.add_argument("--max-tokens", type=int, default=BuildOptions.max_tokens, help="most tokens in a step (T)")
    parser.add_argument("--max-seqs", type=int, default=BuildOptions.max_seqs, help="most sequences in a step (S, L)")
    parser.add_argument("--max-blocks-per-seq", type=int, default=None,
                        help="longest block table (B); default max_position_embeddings / block_size")
    parser.add_argument("--max-pool-blocks", type=int, default=None,
                        help="most blocks per K/V pool; default what the default kv_cache_memory_bytes holds")
    parser.add_argument("--compute-capability", action="append", default=[], metavar="SMxy",
                        help="TensorRT-RTX only: a target GPU architecture, e.g. SM89 (repeatable)")
    parser.add_argument("--tf32", action="store_true", help="let fp32 matrix products use TF32")
    parser.set_defaults(handler=run_command)


def run_command(args: argparse.Namespace) -> int:
    """Handle `python -m export tensorrt`; errors are one line on stderr and exit status 1."""
    options = BuildOptions(
        export_dir=args.export, out_dir=args.out, precision=args.precision, max_tokens=args.max_tokens,
        max_seqs=args.max_seqs, max_blocks_per_seq=args.max_blocks_per_seq, max_pool_blocks=args.max_pool_blocks,
        compute_capabilities=tuple(c.upper() for c in args.compute_capability), tf32=args.tf32,
    )
    try:
        engine = build_engine(options)
    except (ModelFolderError, TensorRTBuildError, TensorRTUnavailable) as exc:
        print(f"[tensorrt] error: {exc}", file=sys.stderr)
        return 1
    axes = ", ".join(f"{axis} {r.min}..{r.max}" for axis, r in engine.profiles[0].items())
    print(f"[tensorrt] wrote {args.out} ({engine.flavour} {engine.tensorrt_version}, {engine.precision}, "
          f"{engine.plan_bytes / 2**20:.1f} MiB plan; graph {engine.graph_seconds:.1f} s, "
          f"build {engine.build_seconds:.1f} s; profile {axes})")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m export.tensorrt_build ...`, the same as `python -m export tensorrt ...`."""
    parser = argparse.ArgumentParser(prog="python -m export")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["tensorrt", *(sys.argv[1:] if argv is None else argv)])
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())

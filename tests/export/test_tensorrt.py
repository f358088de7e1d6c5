"""TensorRT(-RTX) parses and builds every exported graph kind, profiles from the manifest; clear refusals."""

from __future__ import annotations

import json
import platform

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from export.tensorrt_build import (
    BuildOptions, TensorRTBuildError, axis_ranges, build_engine, input_shapes, main, parse_network,
)
from export.tensorrt_precision import calibration_prompts, linear_nodes, prefill_feeds, typed_graph
from lepton.config import RUNNERS, CacheConfig, EngineConfig, RunnerConfig
from lepton.manifest import MANIFEST_FILE, Manifest
from lepton.runners import make_runner, open_folder
from lepton.runners.tensorrt_runner import (
    ENGINE_MANIFEST_FILE, PLAN_FILE, AxisRange, EngineManifest, TensorRTRunner, TensorRTUnavailable, load_tensorrt,
    open_engine_folder, pool_blocks,
)

pytestmark = pytest.mark.skipif(platform.machine() != "x86_64", reason="TensorRT-RTX wheels are x86-64 only")
LIMITS = dict(max_tokens=64, max_seqs=8, max_pool_blocks=128)
GRAPH_KINDS = [("llama", "torchscript"), ("qwen2", "torchscript"), ("llama", "dynamo")]
# NOTE: bounds on max |typed - fp32| / max |fp32| of the logits over a calibration prompt; measured on the
# tiny qwen2: fp16 0.001, int8 0.06, fp8 0.15 (e4m3 keeps 3 mantissa bits).
TYPED_TOLERANCE = {"fp16": 0.01, "int8": 0.12, "fp8": 0.3}


@pytest.fixture(scope="session")
def engines(tiny_exports, tmp_path_factory):
    """(kind, exporter, precision) -> (engine folder, EngineManifest), built on first use."""
    root = tmp_path_factory.mktemp("trt_engines")
    built: dict[tuple[str, str, str], tuple] = {}

    def get(kind: str, exporter: str, precision: str = "fp32"):
        key = (kind, exporter, precision)
        if key not in built:
            out = root / "-".join(key)
            options = BuildOptions(export_dir=tiny_exports(kind, exporter)[0], out_dir=out, precision=precision,
                                   **LIMITS)
            built[key] = (out, build_engine(options))
        return built[key]

    return get


@pytest.mark.parametrize("kind,exporter", GRAPH_KINDS)
def test_fp32_graph_parses_and_builds_with_profiles_from_the_manifest(tiny_exports, engines, kind, exporter):
    export_dir, manifest = tiny_exports(kind, exporter)
    library = load_tensorrt()
    network, parser = parse_network(library, library.module.Builder(library.logger),
                                    export_dir / manifest.model_file, manifest)
    assert parser.num_errors == 0
    assert [network.get_input(i).name for i in range(network.num_inputs)] == manifest.input_names()
    out, engine = engines(kind, exporter)
    assert (out / PLAN_FILE).stat().st_size == engine.plan_bytes > 0
    assert engine.flavour in ("tensorrt", "tensorrt-rtx") and engine.tensorrt_version == library.version
    assert engine.profiles == (axis_ranges(manifest, BuildOptions(export_dir, out, **LIMITS)),)
    assert set(engine.profiles[0]) == set(manifest.dynamic_axes)
    assert EngineManifest.load(out / ENGINE_MANIFEST_FILE) == engine
    assert Manifest.load(out / MANIFEST_FILE) == manifest
    assert open_engine_folder(out).tokenizer_file.is_file()
    assert not out.with_name(out.name + ".tmp").exists()


def test_axis_ranges_follow_flags_manifest_and_default_budget(tiny_exports, tmp_path):
    export_dir, manifest = tiny_exports("llama", "torchscript")
    ranges = axis_ranges(manifest, BuildOptions(export_dir, tmp_path, max_tokens=32, max_seqs=100))
    cfg = manifest.model_config
    assert ranges["T"] == AxisRange(1, 32, 32) and ranges["S"] == AxisRange(1, 32, 32)
    assert ranges["Q"] == AxisRange(1, 1, 32) and ranges["L"] == AxisRange(0, 32, 32)
    assert ranges["B"].max == -(-cfg.max_position_embeddings // manifest.block_size)
    assert ranges["num_blocks"].max == pool_blocks(manifest, CacheConfig().kv_cache_memory_bytes)
    low, opt, high = input_shapes(manifest, ranges)["k_pool_0"]
    assert low[1:] == opt[1:] == high[1:] == (manifest.block_size, cfg.num_kv_heads, cfg.head_dim)
    with pytest.raises(TensorRTBuildError, match="axis T"):
        axis_ranges(manifest, BuildOptions(export_dir, tmp_path, max_tokens=0))


@pytest.mark.parametrize("kind,precision", [("qwen2", "fp16"), ("qwen2", "bf16"), ("qwen2", "int8"),
                                            ("qwen2", "fp8"), ("llama", "fp16"), ("llama", "int8")])
def test_typed_precisions_build(tiny_exports, engines, kind, precision):
    export_dir, manifest = tiny_exports(kind, "torchscript")
    out, engine = engines(kind, "torchscript", precision)
    assert engine.precision == precision and engine.plan_bytes > 0
    graph = onnx.load(str(export_dir / manifest.model_file))
    assert engine.num_linear_layers == len(linear_nodes(graph.graph)) > 0
    assert (engine.calibration is not None) == (precision in ("int8", "fp8"))
    assert not any(p.name.startswith("typed.onnx") for p in out.iterdir())


@pytest.mark.parametrize("precision", sorted(TYPED_TOLERANCE))
def test_typed_graph_computes_the_fp32_model(tiny_exports, precision):
    export_dir, manifest = tiny_exports("qwen2", "torchscript")
    ids = calibration_prompts(export_dir, manifest)[0]
    feeds = prefill_feeds(ids, manifest)
    feeds["logits_indices"] = np.arange(len(ids), dtype=np.int64)
    reference = ort.InferenceSession(str(export_dir / manifest.model_file)).run(["logits"], feeds)[0]
    model = typed_graph(onnx.load(str(export_dir / manifest.model_file)), precision, manifest, export_dir).model
    # NOTE: unfused, Q/DQ run as written; ORT's fused int8 kernels saturate on CPUs without VNNI.
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    typed = ort.InferenceSession(model.SerializeToString(), options).run(["logits"], feeds)[0]
    assert np.abs(typed - reference).max() <= TYPED_TOLERANCE[precision] * np.abs(reference).max()


def test_unsupported_precision_is_a_clear_error(tiny_exports, tmp_path):
    export_dir, _ = tiny_exports("llama", "torchscript")
    out = tmp_path / "fp8-sm86"
    options = BuildOptions(export_dir, out, precision="fp8", compute_capabilities=("SM86",), **LIMITS)
    with pytest.raises(TensorRTBuildError, match=r"tensorrt-rtx \S+ refused to build the fp8 engine for SM86: .*fp8"):
        build_engine(options)
    assert not out.exists() and not out.with_name(out.name + ".tmp").exists()
    with pytest.raises(TensorRTBuildError, match="SM90.*unknown"):
        build_engine(BuildOptions(export_dir, out, compute_capabilities=("SM90",), **LIMITS))


def test_cli(tiny_exports, tmp_path, capsys):
    export_dir, _ = tiny_exports("llama", "torchscript")
    args = ["--export", str(export_dir), "--max-tokens", "32", "--max-seqs", "4", "--max-pool-blocks", "64"]
    assert main([*args, "--out", str(tmp_path / "engine"), "--precision", "bf16", "--compute-capability", "sm89"]) == 0
    written = json.loads((tmp_path / "engine" / ENGINE_MANIFEST_FILE).read_text())
    assert written["precision"] == "bf16" and written["compute_capabilities"] == ["SM89"]
    assert main([*args, "--out", str(tmp_path / "bad"), "--precision", "bf16", "--compute-capability", "SM75"]) == 1
    assert "refused to build the bf16 engine for SM75" in capsys.readouterr().err


def test_runner_needs_a_gpu(engines):
    out, _ = engines("llama", "torchscript")
    config = EngineConfig(model_dir=out, cache=CacheConfig(block_size=8, kv_cache_memory_bytes=1 << 20))
    with pytest.raises(TensorRTUnavailable, match="needs a CUDA GPU"):
        TensorRTRunner(out, config)



@pytest.mark.skipif("tensorrt" not in RUNNERS, reason="lepton.config.RUNNERS does not list tensorrt yet")
def test_runner_factory_serves_engine_folders(engines):
    out, _ = engines("llama", "torchscript")
    config = EngineConfig(model_dir=out, cache=CacheConfig(block_size=8, kv_cache_memory_bytes=1 << 20),
                          runner=RunnerConfig(runner="tensorrt"))
    folder = open_folder(config)
    assert folder.path == out.resolve() and folder.weight_files == ()
    with pytest.raises(TensorRTUnavailable, match="needs a CUDA GPU"):
        make_runner(folder, config)

"""ONNX export of the paged step graph: parity with PyTorch, manifest, graph shape, clear errors."""

from __future__ import annotations

import dataclasses
import json
import shutil

import onnx
import pytest
from safetensors.torch import load_file, save_file

from export.__main__ import main
from lepton.manifest import FORMAT_VERSION, MANIFEST_FILE, Manifest, ManifestError, sha256_file
from export.onnx_export import DYNAMIC_AXES, ExportError, check_pool_reads
from export.validation import FP32_TOLERANCE, StepDriver, pool_blocks, scenarios

SCENARIOS = ["prefill", "decode", "chunked_prefill", "ragged_batch", "shuffled_blocks"]
CHECKS = SCENARIOS + ["polygraphy_graph"] + [f"slots_{name}" for name in SCENARIOS]


def assert_validated(manifest: Manifest) -> None:
    assert [r.name for r in manifest.validation] == CHECKS
    for result in manifest.validation:
        assert result.passed and result.argmax_equal, result
        assert result.max_logit_error <= FP32_TOLERANCE.logits_atol
        assert result.max_kv_error <= FP32_TOLERANCE.kv_atol


def test_export_writes_a_servable_validated_folder(tiny_exports, tiny_models):
    out, manifest = tiny_exports("llama")
    for name in ("model.onnx", MANIFEST_FILE, "config.json", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "generation_config.json"):
        assert (out / name).is_file(), name
    assert not out.with_name(out.name + ".tmp").exists()
    assert_validated(manifest)
    assert manifest.block_size == 8 and manifest.quantization is None
    assert manifest.external_data is None
    source = tiny_models("llama")
    assert manifest.source.config_sha256 == sha256_file(source / "config.json")
    assert manifest.source.weights_sha256 == {"model.safetensors": sha256_file(source / "model.safetensors")}
    assert set(manifest.tools) == {"python", "torch", "onnx", "onnxruntime", "transformers"}


def test_graph_io_has_named_dynamic_axes(tiny_exports):
    out, manifest = tiny_exports("llama")
    graph = onnx.load(str(out / "model.onnx")).graph
    shapes = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in list(graph.input) + list(graph.output)}
    cfg = manifest.model_config
    assert shapes["token_index"] == ["S", "Q"] and shapes["logits_indices"] == ["L"]
    assert shapes["k_pool_1"] == ["num_blocks", manifest.block_size, cfg.num_kv_heads, cfg.head_dim]
    assert shapes["new_v"] == [cfg.num_layers, "T", cfg.num_kv_heads, cfg.head_dim]
    assert shapes["logits"] == ["L", cfg.vocab_size]
    assert set(manifest.dynamic_axes) == set(DYNAMIC_AXES)


def test_pools_are_read_only_by_block_gathers(tiny_exports):
    out, _ = tiny_exports("llama")
    model = onnx.load(str(out / "model.onnx"))
    check_pool_reads(model.graph, ["k_pool_0", "v_pool_0", "k_pool_1", "v_pool_1"])
    copy = onnx.helper.make_node("Identity", ["k_pool_0"], ["k_pool_0_copy"], name="copy")
    model.graph.node.append(copy)
    with pytest.raises(ExportError, match="read by Identity"):
        check_pool_reads(model.graph, ["k_pool_0"])


@pytest.mark.parametrize("kind", ["qwen2", "llama3_rope"])
def test_bias_and_rope_scaling_variants_validate(tiny_exports, kind):
    _, manifest = tiny_exports(kind)
    assert_validated(manifest)
    assert manifest.model_config.attention_bias == (kind == "qwen2")


def test_dynamo_exporter_validates(tiny_exports):
    _, manifest = tiny_exports("llama", "dynamo")
    assert manifest.backend == "dynamo"
    assert_validated(manifest)


def test_manifest_round_trips(tiny_exports, tmp_path):
    out, manifest = tiny_exports("llama")
    assert Manifest.load(out / MANIFEST_FILE) == manifest
    manifest.save(tmp_path / MANIFEST_FILE)
    assert Manifest.load(tmp_path / MANIFEST_FILE) == manifest


def test_manifest_from_another_format_version_is_refused(tiny_exports, tmp_path):
    out, _ = tiny_exports("llama")
    data = json.loads((out / MANIFEST_FILE).read_text())
    data["format_version"] = FORMAT_VERSION + 1
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(data))
    with pytest.raises(ManifestError, match=f"version {FORMAT_VERSION + 1}.*format version {FORMAT_VERSION}"):
        Manifest.load(tmp_path / MANIFEST_FILE)


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(extra=1), r"unknown keys \['extra'\]"),
    (lambda d: d.pop("block_size"), r"missing keys \['block_size'\]"),
    (lambda d: d["model_config"].update(num_layers="2"), r"model_config.num_layers: expected int"),
    (lambda d: d.update(exporter="optimum"), "exporter is 'optimum'"),
])
def test_malformed_manifest_is_a_clear_error(tiny_exports, tmp_path, edit, message):
    out, _ = tiny_exports("llama")
    data = json.loads((out / MANIFEST_FILE).read_text())
    edit(data)
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(data))
    with pytest.raises(ManifestError, match=message):
        Manifest.load(tmp_path / MANIFEST_FILE)


def test_unsupported_model_folder_is_a_clear_error(tiny_models, tmp_path, capsys):
    folder = tmp_path / "gpt2"
    shutil.copytree(tiny_models("llama"), folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    assert main(["onnx", "--model", str(folder), "--out", str(tmp_path / "out")]) == 1
    assert "model_type 'gpt2' is not supported" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_dynamic_rope_is_a_clear_error(tiny_models, tmp_path, capsys):
    folder = tmp_path / "dynamic"
    shutil.copytree(tiny_models("llama"), folder)
    config = json.loads((folder / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    (folder / "config.json").write_text(json.dumps(config))
    assert main(["onnx", "--model", str(folder), "--out", str(tmp_path / "out")]) == 1
    assert "rope type 'dynamic' is not supported" in capsys.readouterr().err


def test_validation_fails_loudly_with_measured_error(tiny_exports, tiny_models, tmp_path, capsys):
    out, _ = tiny_exports("llama")
    folder = tmp_path / "changed"
    shutil.copytree(tiny_models("llama"), folder)
    weights = load_file(str(folder / "model.safetensors"))
    weights["model.norm.weight"] = weights["model.norm.weight"] * 1.01
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    assert main(["validate", "--model", str(folder), "--export", str(out)]) == 1
    captured = capsys.readouterr()
    assert "not the ones" in captured.out
    assert "validation of" in captured.err and "FAILED" in captured.err and "(tol " in captured.err


def test_validate_command_passes_on_the_source(tiny_exports, tiny_models, capsys):
    out, _ = tiny_exports("llama")
    assert main(["validate", "--model", str(tiny_models("llama")), "--export", str(out)]) == 0
    assert capsys.readouterr().out.count(" ok ") == len(CHECKS)


def test_manifest_records_what_validation_measured(tiny_exports):
    _, manifest = tiny_exports("llama")
    record = dataclasses.asdict(manifest.validation[0])
    assert set(record) >= {"max_logit_error", "max_kv_error", "logits_atol", "kv_atol", "passed"}


@pytest.mark.parametrize("block_size", [1, 3, 16])
def test_scenarios_fit_their_pool_and_shuffle_block_ids(block_size):
    import numpy as np

    all_scenarios = scenarios(block_size)
    num_blocks = pool_blocks(all_scenarios, block_size)
    for scenario in all_scenarios:
        driver = StepDriver(scenario, vocab_size=50, num_blocks=num_blocks, block_size=block_size)
        for step in scenario.steps:
            batch = driver.model_input(step)
            driver.advance(step, batch, np.zeros((len(batch.sample_request_ids), 50), np.float32))
        ids = [block for table in driver.tables.values() for block in table]
        assert len(set(ids)) == len(ids)
        contiguous = sorted(ids) == list(range(len(ids)))
        assert contiguous != scenario.shuffle_blocks, scenario.name
    mixed = next(s for s in all_scenarios if s.name == "ragged_batch").steps[1]
    assert sorted(mixed.values())[0] == 1 and max(mixed.values()) > 1  # decodes and prefill chunks together


def test_large_graphs_keep_weights_in_one_external_file(tiny_models, tmp_path, monkeypatch):
    import export.onnx_export as onnx_export

    monkeypatch.setattr(onnx_export, "MAX_INLINE_BYTES", 0)  # as if the weights were over 2 GB
    out = tmp_path / "external"
    manifest = onnx_export.export_onnx(onnx_export.ExportOptions(
        model_dir=tiny_models("llama"), out_dir=out, block_size=8, exporter="torchscript"))
    assert manifest.external_data == "model.onnx.data"
    assert (out / "model.onnx.data").stat().st_size > (out / "model.onnx").stat().st_size
    assert_validated(manifest)  # the runner loaded the graph with its external weights

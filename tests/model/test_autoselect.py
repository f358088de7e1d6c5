"""Choosing the serving configuration: only quality-proven candidates, timed through the engine."""

from __future__ import annotations

import json
import os

from lepton.autoselect import (
    BATCH, Candidate, Timing, candidates, choose, cpu_features, fingerprint, report_path, time_candidate,
)


def fake_export(root, name, source, method=None, failures=None):
    folder = root / name
    folder.mkdir(parents=True)
    manifest = {"source": {"path": str(source)}, "quantization": {"method": method} if method else None}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    if failures is not None:
        (folder / "quality.json").write_text(json.dumps({"variants": [{"name": method, "failures": failures}]}))
    return folder


def test_the_score_is_time_per_token_under_load_with_a_quarter_of_a_single_step_spread_over_it(tmp_path):
    def timing(name, batch_ms, one_ms):
        return Timing(Candidate(name, "torch", tmp_path, 1), batch_ms, one_ms)

    assert timing("a", 48.0, 32.0).score == (48.0 + 0.25 * 32.0) / BATCH
    # NOTE: the step times autoselect measured here (docs/performance.md, "Threads when served"):
    # served at 16 streams the last made 108-112 tok/s, the others 134-174; the old score picked it.
    measured = [timing("torch bf16, 1 thread", 51.5, 28.8), timing("onnxruntime fp32, 2 threads", 58.5, 26.8),
                timing("onnxruntime fp32, 1 thread", 66.8, 22.2)]
    assert [t.candidate.name for t in sorted(measured, key=lambda t: t.score)] == [
        "torch bf16, 1 thread", "onnxruntime fp32, 2 threads", "onnxruntime fp32, 1 thread"]


def test_only_exports_of_this_model_that_passed_their_gate_are_candidates(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    exports = tmp_path / "onnx"
    fake_export(exports, "m", model)
    fake_export(exports, "m-int8", model, "int8", failures=[])
    fake_export(exports, "m-int4", model, "int4", failures=["top-1 agreement 0.5 < 0.85 (min)"])
    fake_export(exports, "m-int4b", model, "int4")  # no quality report at all
    fake_export(exports, "other", tmp_path / "other-model")
    found, skipped = candidates(model, exports, tmp_path / "quality", cpu={"avx512_bf16": False})
    names = {(c.runner, c.model_dir.name) for c in found}
    assert names == {("torch", "model"), ("onnxruntime", "m"), ("onnxruntime", "m-int8")}
    assert len(skipped) == 3 and any("top-1 agreement" in s for s in skipped) and any("no quality.json" in s for s in skipped)
    assert "torch bf16: no AVX512-BF16 / AMX on this processor" in skipped
    cores = len(os.sched_getaffinity(0))
    # NOTE: torch leaves a core to Triton's front end; ONNX Runtime is timed with both counts
    assert {c.num_threads for c in found if c.runner == "torch"} == {max(1, cores - 1)}
    assert {c.num_threads for c in found if c.runner == "onnxruntime"} == {cores, max(1, cores - 1)}


def write_runner_report(quality_dir, model, failures, stamp=None):
    path = report_path(model, "torch", "bfloat16", quality_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"fingerprint": stamp or fingerprint(model),
                                "variants": [{"name": "torch bfloat16", "failures": failures}]}))


def test_torch_bf16_needs_bf16_hardware_and_a_passed_report_of_these_very_files(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"weights")
    quality = tmp_path / "quality"
    bf16_cpu, plain_cpu = {"avx512_bf16": True}, {"avx512_bf16": False, "amx_bf16": False}

    def bf16_candidates(cpu):
        found, skipped = candidates(model, tmp_path / "onnx", quality, cpu)
        return [c for c in found if c.dtype == "bfloat16"], [s for s in skipped if s.startswith("torch bf16")]

    found, skipped = bf16_candidates(bf16_cpu)
    assert not found and "no quality report" in skipped[0]
    write_runner_report(quality, model, ["KL mean 0.01 > 0.002 (max)"])
    found, skipped = bf16_candidates(bf16_cpu)
    assert not found and "KL mean 0.01" in skipped[0]
    write_runner_report(quality, model, [], stamp="computed from other weights")
    found, skipped = bf16_candidates(bf16_cpu)
    assert not found and "computed from other files" in skipped[0]
    write_runner_report(quality, model, [])
    found, skipped = bf16_candidates(bf16_cpu)
    assert found and not skipped and all(c.runner == "torch" for c in found)
    assert bf16_candidates({"amx_bf16": True})[0] == found
    found, skipped = bf16_candidates(plain_cpu)
    assert not found and "no AVX512-BF16 / AMX" in skipped[0]
    (model / "model.safetensors").write_bytes(b"other weights")  # NOTE: the size changes the fingerprint
    found, skipped = bf16_candidates(bf16_cpu)
    assert not found and "computed from other files" in skipped[0]


def test_cpu_features_are_probed():
    cpu = cpu_features()
    assert cpu["cores"] >= 1 and isinstance(cpu["avx2"], bool)


def test_timing_runs_the_engine_and_the_choice_is_cached(demo_model_dir, tmp_path):
    timing = time_candidate(Candidate("torch fp32", "torch", demo_model_dir, 1), steps=2)
    assert timing.decode_batch_ms > 0 and timing.decode_one_ms > 0
    first = choose(demo_model_dir, tmp_path / "no-exports", tmp_path / "cache", tmp_path / "no-reports")
    again = choose(demo_model_dir, tmp_path / "no-exports", tmp_path / "cache", tmp_path / "no-reports")
    assert not first.cached and again.cached and again.candidate == first.candidate
    assert first.candidate.runner == "torch" and "chose torch fp32" in first.explain()

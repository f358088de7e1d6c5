"""Choosing the serving configuration: only quality-proven candidates, timed through the engine."""

from __future__ import annotations

import json
import os

from lepton.autoselect import Candidate, candidates, choose, cpu_features, time_candidate


def fake_export(root, name, source, method=None, failures=None):
    folder = root / name
    folder.mkdir(parents=True)
    manifest = {"source": {"path": str(source)}, "quantization": {"method": method} if method else None}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    if failures is not None:
        (folder / "quality.json").write_text(json.dumps({"variants": [{"name": method, "failures": failures}]}))
    return folder


def test_only_exports_of_this_model_that_passed_their_gate_are_candidates(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    exports = tmp_path / "onnx"
    fake_export(exports, "m", model)
    fake_export(exports, "m-int8", model, "int8", failures=[])
    fake_export(exports, "m-int4", model, "int4", failures=["top-1 agreement 0.5 < 0.85 (min)"])
    fake_export(exports, "m-int4b", model, "int4")  # no quality report at all
    fake_export(exports, "other", tmp_path / "other-model")
    found, skipped = candidates(model, exports)
    names = {(c.runner, c.model_dir.name) for c in found}
    assert names == {("torch", "model"), ("onnxruntime", "m"), ("onnxruntime", "m-int8")}
    assert len(skipped) == 2 and any("top-1 agreement" in s for s in skipped) and any("no quality.json" in s for s in skipped)
    cores = len(os.sched_getaffinity(0))
    assert {c.num_threads for c in found} == {cores, max(1, cores - 1)}


def test_cpu_features_are_probed():
    cpu = cpu_features()
    assert cpu["cores"] >= 1 and isinstance(cpu["avx2"], bool)


def test_timing_runs_the_engine_and_the_choice_is_cached(demo_model_dir, tmp_path):
    timing = time_candidate(Candidate("torch fp32", "torch", demo_model_dir, 1), steps=2)
    assert timing.decode_batch_ms > 0 and timing.decode_one_ms > 0
    first = choose(demo_model_dir, tmp_path / "no-exports", tmp_path / "cache")
    again = choose(demo_model_dir, tmp_path / "no-exports", tmp_path / "cache")
    assert not first.cached and again.cached and again.candidate == first.candidate
    assert first.candidate.runner == "torch" and "chose torch fp32" in first.explain()

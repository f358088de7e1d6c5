"""The torch runner in bfloat16, and the float32 export's products in bfloat16, judged against the float32
export: the reports autoselect reads."""

from __future__ import annotations

import json

import pytest

from export.quality import EvalOptions
from export.runner_quality import GATES, evaluate_onnxruntime, evaluate_runner, main
from lepton.autoselect import fingerprint, report_path, runner_quality_failures
from tests.export.conftest import cpu_flags

EVAL = EvalOptions(num_windows=2, window_len=32, num_threads=1)


@pytest.fixture(scope="module")
def tiny(tiny_exports, tiny_models):
    export_dir, _ = tiny_exports("llama")
    return tiny_models("llama"), export_dir


def test_bfloat16_is_close_to_float32_but_not_equal(tiny):
    model, export_dir = tiny
    report = evaluate_runner(model, export_dir, "bfloat16", EVAL)
    assert report.num_positions == 2 * 31
    # NOTE: bfloat16 keeps 8 bits of mantissa: the logits move, but stay close
    assert 0 < report.max_abs_logit_error < 1.0 and 0 < report.kl_mean < 0.05
    assert report.gate == GATES["bfloat16"] and report.step_ms > 0 and report.reference_step_ms > 0
    assert report.perplexity == pytest.approx(report.reference_perplexity, rel=0.05)


def test_the_report_is_what_autoselect_reads(tiny, tmp_path, monkeypatch, capsys):
    model, export_dir = tiny
    out = report_path(model, "torch", "bfloat16", tmp_path)
    monkeypatch.setattr("export.runner_quality.EvalOptions", lambda num_windows: EVAL)
    assert main(["--model", str(model), "--reference", str(export_dir), "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["fingerprint"] == fingerprint(model) and data["model_dir"] == str(model.resolve())
    (variant,) = data["variants"]
    assert variant["passed"] == (not variant["failures"])
    assert runner_quality_failures(model, "torch", "bfloat16", tmp_path) == "; ".join(variant["failures"])
    assert out.with_suffix(".md").read_text().startswith("Against")
    assert main(["--model", str(model), "--reference", str(export_dir), "--out", str(out)]) == 0
    assert "up to date" in capsys.readouterr().out


def test_a_reference_of_other_weights_is_refused(tiny, tiny_models):
    _, export_dir = tiny
    with pytest.raises(ValueError, match="is an export of"):
        evaluate_runner(tiny_models("qwen2"), export_dir, "bfloat16", EVAL)


needs_bf16 = pytest.mark.skipif(not ({"avx512f", "avx512_bf16"} <= cpu_flags() or {"avx2", "fma"} <= cpu_flags()),
                                reason="weight_dtype=bfloat16 needs AVX-512 BF16 or AVX2 + FMA")


@needs_bf16
def test_bfloat16_weights_of_the_export_are_judged_against_the_export_itself(tiny, tmp_path, monkeypatch, capsys):
    _, export_dir = tiny
    report = evaluate_onnxruntime(export_dir, "bfloat16", EVAL)
    assert report.num_positions == 2 * 31 and report.preset == "onnxruntime-weights-bfloat16"
    assert 0 < report.max_abs_logit_error < 1.0 and 0 < report.kl_mean < 0.05
    out = report_path(export_dir, "onnxruntime", "bfloat16", tmp_path)
    monkeypatch.setattr("export.runner_quality.EvalOptions", lambda num_windows: EVAL)
    assert main(["--runner", "onnxruntime", "--reference", str(export_dir), "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["fingerprint"] == fingerprint(export_dir, "onnxruntime") != fingerprint(export_dir)
    (variant,) = data["variants"]
    assert runner_quality_failures(export_dir, "onnxruntime", "bfloat16", tmp_path) == "; ".join(variant["failures"])
    assert main(["--runner", "onnxruntime", "--reference", str(export_dir), "--out", str(out)]) == 0
    assert "up to date" in capsys.readouterr().out


def test_torch_needs_its_model_folder(tiny):
    _, export_dir = tiny
    with pytest.raises(SystemExit):
        main(["--reference", str(export_dir)])

"""make perf and make genai-perf, seconds-long: each script's --quick mode against the session server."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest

from lepton.server import PROJECT_ROOT

pytestmark = pytest.mark.e2e


def run_module(module: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", module, *args], cwd=PROJECT_ROOT, capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    return result


def test_perf_quick_writes_csv_and_plots(server, tmp_path):
    result = run_module("benchmarks.perf", "--quick", "--url", server.grpc_url, "--metrics-url", server.metrics_url,
                        "--out", str(tmp_path))
    with open(tmp_path / "perf.csv") as f:
        rows = list(csv.DictReader(f))
    assert {(r["style"], r["concurrency"]) for r in rows} == {(s, c) for s in ("vllm", "tensor", "chat")
                                                              for c in ("1", "2")}
    for r in rows:
        assert r["error"] == "", r
        # NOTE: --quick sends max(4, 2*c) requests of exactly 8 tokens (ignore_eos).
        assert int(r["num_requests"]) == int(r["server_requests"]) == 4
        assert int(r["server_failures"]) == 0
        assert int(r["server_generated_tokens"]) == 4 * 8 == int(r["output_tokens"])
        assert float(r["output_tok_per_s"]) > 0 and float(r["pa_infer_per_s"]) > 0
        assert 0 < float(r["ttft_ms_p50"]) <= float(r["latency_ms_p50"]) < 60_000
        assert 0 < float(r["itl_ms_p50"]) < 10_000
    for name in ("throughput_vs_ttft_ms.png", "throughput_vs_latency_ms.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    data = json.loads((tmp_path / "input_vllm.json").read_text())["data"]
    assert json.loads(data[0]["sampling_parameters"][0])["max_tokens"] == 8
    assert "chat" in result.stdout and "out tok/s" in result.stdout


def test_genai_perf_quick_writes_summary(server, tmp_path):
    # NOTE: one backend: test_genai_perf.py already profiles both styles; genai-perf takes ~30 s a run here.
    result = run_module("benchmarks.genai_perf", "--quick", "--backends", "vllm", "--url", server.grpc_url,
                        "--out", str(tmp_path))
    rows = json.loads((tmp_path / "summary.json").read_text())
    assert [r["backend"] for r in rows] == ["vllm"]
    for r in rows:
        assert "error" not in r, r
        assert r["request_count"] >= 6
        assert 0 < r["time_to_first_token_avg"] <= r["request_latency_avg"] < 60_000
        assert 0 < r["inter_token_latency_avg"] < 10_000
        assert r["output_token_throughput_avg"] > 0
        assert r["input_sequence_length_avg"] == pytest.approx(24, abs=2)
        assert list((tmp_path / f"{r['backend']}-c2").rglob("profile_export_genai_perf.json"))
    assert (tmp_path / "summary.csv").exists() and "TTFT ms" in result.stdout

"""The stateless models' perf_analyzer sweep (benchmarks.stateless), seconds-long, against the session server."""

from __future__ import annotations

import csv
import subprocess
import sys

import pytest

from lepton.server import PROJECT_ROOT

pytestmark = pytest.mark.e2e


def test_served_sweep_writes_csv_and_table(server, tmp_path):
    result = subprocess.run([sys.executable, "-m", "benchmarks.stateless", "--quick", "--served", "--url",
                             server.grpc_url, "--out", str(tmp_path)], cwd=PROJECT_ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    with open(tmp_path / "stateless.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["model"], r["concurrency"]) for r in rows] == [(m, c) for m in ("tokenizer", "embeddings")
                                                              for c in ("1", "4")]
    for r in rows:
        assert not r.get("error"), r
        # NOTE: --quick sends max(8, 2 * c) requests; the server counted each exactly once
        assert int(r["num_requests"]) == int(r["server_inferences"]) == 8
        assert float(r["infer_per_s"]) > 0 and 0 < float(r["p50_ms"]) <= float(r["p99_ms"]) < 60_000
        assert 1.0 <= float(r["mean_batch"]) <= 4.0
    table = (tmp_path / "stateless.md").read_text()
    assert "| tokenizer | as served | 1 | 4 |" in table and "benchmarks.stateless --quick --served" in table

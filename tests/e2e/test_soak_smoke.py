"""The soak (benchmarks/soak.py, `make soak`) for one minute against a real server, and its verdict's rules.

The 30-minute run is `make soak`, not a test; this checks that the script holds its 32 streams,
samples what it says, judges, and writes its report.
"""

from __future__ import annotations

import json

import pytest

from benchmarks.soak import SoakOptions, Target, run, verdict

DURATION_S = 60.0


@pytest.mark.e2e
def test_one_minute_soak_passes_and_writes_its_report(load_server, demo_model_dir, tmp_path):
    target = Target(load_server.grpc_url, load_server.metrics_url, load_server.process.pid, demo_model_dir)
    options = SoakOptions(duration_s=DURATION_S, warmup_s=20.0, interval_s=2.0, out_dir=tmp_path)
    report = run(target, options, command="tests/e2e/test_soak_smoke.py", log=lambda line: None)

    assert report["verdict"]["passed"], report["verdict"]
    summary, samples = report["summary"], report["samples"]
    assert summary["errors"] == 0 and summary["completed"] >= options.concurrency, summary
    assert summary["ttft_ms"]["p50"] > 0 and summary["itl_ms"]["p50"] > 0, summary
    assert len(samples) >= DURATION_S / options.interval_s - 2
    assert all(s["rss_mib"] > 0 and s["threads"] > 0 for s in samples)
    # NOTE: the streams are held: most samples see (nearly) all 32 running, none left at the end.
    assert sorted(s["num_running"] for s in samples)[len(samples) // 2] >= options.concurrency - 4, samples
    assert report["verdict"]["num_samples_judged"] >= 10 and report["verdict"]["rss_growth_mib"] is not None
    idle = report["idle_at_end"]
    assert idle["lepton_kv_blocks_used"] == 0 and idle["lepton_num_running"] == 0 and idle["lepton_num_waiting"] == 0

    assert json.loads((tmp_path / "soak.json").read_text())["verdict"] == report["verdict"]
    assert "**PASSED**" in (tmp_path / "soak.md").read_text()
    for name in ("soak_memory", "soak_kv", "soak_latency"):
        assert (tmp_path / "img" / f"{name}.png").stat().st_size > 10_000


def fake_samples(rss: list[float], threads: list[int], interval_s: float = 10.0) -> list:
    from benchmarks.soak import Sample

    return [Sample(t_s=i * interval_s, rss_mib=r, threads=n, kv_blocks_used=1, kv_cache_usage=0.1, num_running=32,
                   num_waiting=0, completed=5, errors=0, output_tok_per_s=100.0)
            for i, (r, n) in enumerate(zip(rss, threads))]


IDLE = {"lepton_kv_blocks_used": 0.0}
OPTIONS = SoakOptions(duration_s=200.0, warmup_s=50.0)


@pytest.mark.parametrize("rss,threads,idle,passed,words", [
    ([900] * 5 + [1000, 1010, 990, 1005, 1000] * 3, [300] * 20, IDLE, True, ""),  # growth during warm-up only
    ([1000 + 2 * i for i in range(20)], [300] * 20, IDLE, True, ""),  # 30 MiB: under the bound
    ([1000 + 8 * i for i in range(20)], [300] * 20, IDLE, False, "RSS grew"),  # 120 MiB after warm-up
    ([1000] * 20, [300] * 10 + [320] * 10, IDLE, False, "threads grew by 20"),
    ([1000] * 20, [300] * 20, None, False, "still held"),
])
def test_verdict_judges_growth_after_warmup(rss, threads, idle, passed, words):
    result = verdict(fake_samples(rss, threads), [], idle, OPTIONS)
    assert result["passed"] is passed and words in "; ".join(result["failures"]), result


def test_verdict_fails_on_any_request_error():
    from benchmarks.loadgen import RequestRecord
    from benchmarks.workload import RequestSpec

    failed = RequestRecord(RequestSpec("r", "p", 1, 4), error="StatusCode.UNAVAILABLE: server busy")
    result = verdict(fake_samples([1000] * 20, [300] * 20), [failed], IDLE, OPTIONS)
    assert not result["passed"] and "1 request(s) failed" in result["failures"][0]

"""benchmarks.peers' W2 sent by perf_analyzer: the real binary against the real server, its export read back."""

from __future__ import annotations

import pytest
import tokenizers

from benchmarks.peers.lepton_peer import run_served_perf_analyzer
from benchmarks.peers.workloads import Workload
from benchmarks.workload import PromptFactory, fixed_requests

pytestmark = pytest.mark.e2e


def test_perf_analyzer_sends_each_request_once_and_its_timestamps_become_the_records(server, demo_model_dir, tmp_path):
    factory = PromptFactory(tokenizers.Tokenizer.from_file(str(demo_model_dir / "tokenizer.json")), 7)
    specs = tuple(fixed_requests(factory, "pa", 5, 24, 6))
    summary = run_served_perf_analyzer(server, Workload("w2", "test", specs, concurrency=2), tmp_path)
    assert summary["client"] == "perf_analyzer" and summary["num_errors"] == 0, summary
    assert summary["num_requests"] == 5 and summary["output_tokens"] == 5 * 6
    assert summary["prompt_tokens"] == sum(s.num_prompt_tokens for s in specs)
    assert summary["finish_reasons"] == ["length"] and summary["responses_per_output_token"] >= 1
    assert summary["output_tok_per_s"] > 0 and summary["ttft_ms"]["n"] == 5 and summary["itl_ms"]["n"] == 5 * 5
    assert summary["cpu"]["client_s"] > 0 and summary["cpu"]["server_s"] > 0

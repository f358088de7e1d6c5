"""Admission control (a full queue answers busy at once) and the metrics port."""

from __future__ import annotations

import queue
import time

import pytest
import tritonclient.grpc as grpcclient

from test_cancel import wait_idle
from client.metrics import scrape as metrics
from tritonio import grpc_generate, http_post, make_inputs

pytestmark = pytest.mark.e2e

LONG = {"text_input": "Once upon a time", "max_tokens": 900, "ignore_eos": True, "stream": True}
SEATS, QUEUE = 16, 8  # max_num_seqs and max_queue_size of the test server (tests/conftest.py)


def test_full_queue_answers_busy_and_the_server_recovers(server):
    wait_idle(server)
    responses: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(server.grpc_url)
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    total = SEATS + QUEUE + 6
    for i in range(total):
        client.async_stream_infer("lepton", make_inputs(LONG), request_id=f"busy-{i}")
    busy, deadline = [], time.monotonic() + 30
    while len(busy) < total - SEATS - QUEUE and time.monotonic() < deadline:
        result, error = responses.get(timeout=30)
        if error is not None:
            busy.append(str(error))
    assert len(busy) == total - SEATS - QUEUE
    assert all("server busy" in message for message in busy)
    body = {"inputs": [{"name": "text_input", "shape": [1], "datatype": "BYTES", "data": ["Hi"]}]}
    status, text = http_post(server.http_url, "/v2/models/lepton_infer/infer", body)
    assert status == 503 and "server busy" in text
    # NOTE: Triton 2.51's generate extension answers every model error with 400; the text says busy.
    status, text = http_post(server.http_url, "/v2/models/lepton/generate", {"text_input": "Hi", "max_tokens": 2})
    assert status == 400 and "server busy" in text
    # NOTE: the metrics port shows the full engine within a few steps (the loop waits for its sender
    # when it is STEPS_AHEAD steps ahead); only then does "idle" below mean the cancelled requests are gone.
    deadline = time.monotonic() + 10
    while (seen := metrics(server.metrics_url)).get("lepton_num_running") != SEATS \
            or seen.get("lepton_num_waiting") != QUEUE:
        assert time.monotonic() < deadline, seen
        time.sleep(0.05)
    client.stop_stream(cancel_requests=True)
    client.close()
    wait_idle(server)
    assert grpc_generate(server.grpc_url, {"text_input": "Hello", "max_tokens": 3, "ignore_eos": True}).num_output_tokens == 3


def test_metrics_port_reports_engine_state_and_latency_histograms(server):
    wait_idle(server)
    before = metrics(server.metrics_url)
    grpc_generate(server.grpc_url, {"text_input": "Hello there", "max_tokens": 5, "ignore_eos": True, "stream": True})
    after = wait_idle(server)
    assert after["lepton_kv_blocks_total"] == before["lepton_kv_blocks_total"] > 0
    assert after["lepton_generated_tokens_total"] - before["lepton_generated_tokens_total"] == 5
    assert after["lepton_time_to_first_token_seconds_count"] - before.get("lepton_time_to_first_token_seconds_count", 0) == 1
    assert after["lepton_inter_token_latency_seconds_count"] - before.get("lepton_inter_token_latency_seconds_count", 0) >= 1
    for name in ("lepton_num_waiting", "lepton_kv_cache_usage", "lepton_prefix_cache_hits_total",
                 "lepton_prefix_cache_queries_total", "lepton_num_preemptions_total", "lepton_prompt_tokens_total"):
        assert name in after

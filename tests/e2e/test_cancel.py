"""A client that cancels mid-stream: the request is aborted, its KV blocks freed, others unaffected."""

from __future__ import annotations

import queue
import threading
import time

import pytest
import tritonclient.grpc as grpcclient

from client.metrics import scrape as metrics
from client.metrics import wait_idle as wait_idle_at
from tritonio import grpc_generate, make_inputs

pytestmark = pytest.mark.e2e

LONG = {"text_input": "Once upon a time", "max_tokens": 900, "ignore_eos": True, "stream": True}


def wait_idle(server, timeout: float = 20.0) -> dict[str, float]:
    """Poll the server's metrics until no request runs or waits and no KV block is held."""
    return wait_idle_at(server.metrics_url, timeout, poll_s=0.1)


def start_long_stream(server, num_responses: int):
    """Open a stream, send LONG, wait for num_responses deltas; returns (client, responses queue)."""
    responses: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(server.grpc_url)
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    client.async_stream_infer("lepton", make_inputs(LONG))
    for _ in range(num_responses):
        result, error = responses.get(timeout=30)
        assert error is None, error
    return client, responses


def test_cancel_mid_stream_frees_everything_and_others_continue(server):
    wait_idle(server)
    other: dict = {}
    worker = threading.Thread(target=lambda: other.update(
        reply=grpc_generate(server.grpc_url, {"text_input": "Hello", "max_tokens": 40, "ignore_eos": True, "stream": True})))
    client, _ = start_long_stream(server, num_responses=3)
    worker.start()
    # NOTE: stats are published every 50 ms while busy; wait for a snapshot that shows the stream.
    deadline = time.monotonic() + 10
    while metrics(server.metrics_url)["lepton_kv_blocks_used"] == 0:
        assert time.monotonic() < deadline, "the running stream never showed in the metrics"
        time.sleep(0.05)
    started = time.monotonic()
    client.stop_stream(cancel_requests=True)
    client.close()
    worker.join(60)
    assert other["reply"].num_output_tokens == 40 and other["reply"].finish_reason == "length"
    values = wait_idle(server)
    # NOTE: 900 tokens take tens of seconds here; idle well before that means it was aborted.
    assert time.monotonic() - started < 15
    assert values["lepton_generated_tokens_total"] < values["lepton_prompt_tokens_total"] + 900 * 10


def test_storm_of_cancellations_leaves_the_pool_full(server):
    wait_idle(server)
    clients = [start_long_stream(server, num_responses=1 + i % 3)[0] for i in range(8)]
    for client in clients:
        client.stop_stream(cancel_requests=True)
        client.close()
    values = wait_idle(server)
    assert values["lepton_kv_blocks_used"] == 0
    reply = grpc_generate(server.grpc_url, {"text_input": "Hello", "max_tokens": 5, "ignore_eos": True})
    assert reply.num_output_tokens == 5


def test_http_client_that_disconnects_mid_stream_is_aborted(server):
    import http.client
    import json as _json

    wait_idle(server)
    host, port = server.http_url.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("POST", "/v2/models/lepton/generate_stream", body=_json.dumps(LONG),
                 headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    events = 0
    while events < 3:  # NOTE: HTTPResponse.readline undoes the chunked encoding
        events += response.readline().startswith(b"data:")
    started = time.monotonic()
    conn.sock.shutdown(2)
    conn.close()
    wait_idle(server, timeout=30)
    assert time.monotonic() - started < 15

"""Two engine instances of `lepton` in one tritonserver (instance_group count 2, KIND_CPU).

Triton spreads concurrent streams over both (each engine's own metrics series show it), each
instance's process is pinned to its own cores, cancellation frees both engines' KV blocks, a full
engine answers busy, and the summed metrics return to 0.
"""

from __future__ import annotations

import os
import queue
import re
import threading
import time

import pytest
import tritonclient.grpc as grpcclient

from client.metrics import scrape_engines, wait_idle
from lepton.lifetime import descendants
from tritonio import grpc_generate, http_post, make_inputs

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

SEATS, QUEUE = 4, 4  # max_num_seqs and max_queue_size of each engine instance
LONG = {"text_input": "Once upon a time", "max_tokens": 1000, "ignore_eos": True, "stream": True}


@pytest.fixture(scope="module")
def server(demo_model_dir, tmp_path_factory, start_triton):
    triton = start_triton(demo_model_dir, tmp_path_factory.mktemp("instances"),
                          {"max_num_seqs": str(SEATS), "max_queue_size": str(QUEUE), "kv_cache_memory_bytes": "64M"},
                          instances=2)
    yield triton
    triton.stop()


def idle(server, timeout: float = 30.0) -> dict[str, dict[str, float]]:
    """Wait until the summed figures are 0; then every engine's own figures must be 0 too."""
    wait_idle(server.metrics_url, timeout, poll_s=0.1)
    engines = scrape_engines(server.metrics_url)
    for engine, values in engines.items():
        assert values["lepton_num_running"] == values["lepton_num_waiting"] == values["lepton_kv_blocks_used"] == 0, engine
    return engines


def generated(engines: dict[str, dict[str, float]]) -> dict[str, float]:
    return {engine: values["lepton_generated_tokens_total"] for engine, values in engines.items()}


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="two instances share a single core")
def test_each_instance_is_pinned_to_its_own_core_with_its_share_of_the_kv_cache(server):
    engines = idle(server)
    assert sorted(engines) == ["0", "1"]
    log = server.log_file.read_text()
    cores = sorted(os.sched_getaffinity(0))
    mine = {}
    for name in ("lepton_0_0", "lepton_0_1"):
        match = re.search(rf"lepton: {name}: engine (\d) of 2 on cores \[([\d, ]+)\], (\d+) threads, KV cache 32 MiB", log)
        assert match, f"no placement line for {name}"
        mine[name] = {int(c) for c in match.group(2).split(",")}
        assert int(match.group(3)) == len(mine[name])
    assert mine["lepton_0_0"].isdisjoint(mine["lepton_0_1"]) and mine["lepton_0_0"] | mine["lepton_0_1"] == set(cores)
    # NOTE: every thread of each instance's backend process, not only the one that pinned itself.
    stubs = {}
    for pid in descendants(server.process.pid):
        try:
            argv = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
        except FileNotFoundError:
            continue
        stubs.update({name: pid for name in mine if name.encode() in argv})
    assert sorted(stubs) == sorted(mine)
    for name, pid in stubs.items():
        tasks = os.listdir(f"/proc/{pid}/task")
        assert len(tasks) > 3 and {frozenset(os.sched_getaffinity(int(t))) for t in tasks} == {frozenset(mine[name])}
    assert engines["0"]["lepton_kv_blocks_total"] == engines["1"]["lepton_kv_blocks_total"] > 0


def test_concurrent_streams_are_served_by_both_instances(server):
    before = generated(idle(server))
    replies, num_streams, max_tokens = [], 8, 24

    def one(i: int) -> None:
        fields = {"text_input": f"Stream {i} says", "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
        replies.append(grpc_generate(server.grpc_url, fields))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(num_streams)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert [r.num_output_tokens for r in replies] == [max_tokens] * num_streams
    # NOTE: lepton_infer forwards to lepton (BLS) whichever instance takes it
    status, _ = http_post(server.http_url, "/v2/models/lepton_infer/infer", {"inputs": [
        {"name": "text_input", "shape": [1], "datatype": "BYTES", "data": ["Hi"]},
        {"name": "max_tokens", "shape": [1], "datatype": "INT32", "data": [4]}]})
    assert status == 200
    after = generated(idle(server))
    served = {engine: after[engine] - before[engine] for engine in after}
    assert sum(served.values()) == num_streams * max_tokens + 4
    assert all(tokens > 0 for tokens in served.values()), f"one engine served nothing: {served}"


def open_streams(server, count: int, gap_s: float = 0.0):
    """count LONG requests on one gRPC stream, gap_s apart; returns (client, queue of (result, error))."""
    responses: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(server.grpc_url)
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    for i in range(count):
        client.async_stream_infer("lepton", make_inputs(LONG), request_id=f"long-{i}")
        time.sleep(gap_s)
    return client, responses


def wait_until(predicate, timeout: float = 30.0, message=lambda: "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, message()
        time.sleep(0.05)


def drain(responses: queue.Queue) -> list[str]:
    """What the streams answered so far: errors and final finish reasons."""
    answers = []
    while not responses.empty():
        result, error = responses.get()
        if error is not None:
            answers.append(str(error))
        elif result.as_numpy("finish_reason")[0]:
            answers.append(result.as_numpy("finish_reason")[0].decode())
    return answers


def held(server) -> dict[str, float]:
    """Requests each engine holds (running or queued)."""
    return {engine: v["lepton_num_running"] + v["lepton_num_waiting"] for engine, v in scrape_engines(server.metrics_url).items()}


def test_cancel_frees_both_instances(server):
    before = generated(idle(server))
    # NOTE: spaced, Triton mostly hands them to the two instances in turn, but need not: whichever
    # instance's execute() returns first takes the next request, so now and then
    # all eight land on one (once in about 20 runs here). Then one more stream a second, up to what
    # both engines can hold.
    sent = 2 * SEATS
    client, responses = open_streams(server, sent, gap_s=0.1)
    deadline, last_sent = time.monotonic() + 60, time.monotonic()
    while not all(count > 0 for count in held(server).values()):
        assert time.monotonic() < deadline, f"streams not on both engines: {held(server)}; answers: {drain(responses)}"
        if sent < 2 * (SEATS + QUEUE) and time.monotonic() - last_sent > 1.0:
            client.async_stream_infer("lepton", make_inputs(LONG), request_id=f"long-{sent}")
            sent, last_sent = sent + 1, time.monotonic()
        time.sleep(0.05)
    client.stop_stream(cancel_requests=True)
    client.close()
    after = generated(idle(server))
    # NOTE: run to the end, the streams would generate exactly sent x 1000 tokens
    assert sum(after.values()) - sum(before.values()) < sent * LONG["max_tokens"]
    assert grpc_generate(server.grpc_url, {"text_input": "Hello", "max_tokens": 3, "ignore_eos": True}).num_output_tokens == 3


def test_full_instances_answer_busy_and_recover(server):
    idle(server)
    extra = 8
    total = 2 * (SEATS + QUEUE) + extra
    client, responses = open_streams(server, total)
    busy: list[str] = []
    finished = []

    def settled() -> bool:
        while not responses.empty():
            result, error = responses.get()
            if error is not None:
                busy.append(str(error))
            elif result.as_numpy("finish_reason")[0]:
                finished.append(result)
        return len(busy) + len(finished) + sum(held(server).values()) == total

    # NOTE: every request is held by an engine (running or queued), answered busy, or (slow machine) done.
    wait_until(settled, message=lambda: f"requests unaccounted for: {len(busy)} busy, {held(server)} held")
    assert busy and all("server busy" in message for message in busy), busy
    # NOTE: a request that finished while the burst was still arriving freed a seat for a later one
    assert len(busy) >= extra - len(finished)
    # NOTE: not "both engines took requests": Triton's default scheduler hands a request to whichever
    # instance's execute() returns first, and under a burst one instance can take all it can hold.
    for engine, values in scrape_engines(server.metrics_url).items():
        assert values["lepton_num_running"] <= SEATS and values["lepton_num_waiting"] <= QUEUE, engine
    client.stop_stream(cancel_requests=True)
    client.close()
    idle(server)
    assert grpc_generate(server.grpc_url, {"text_input": "Hello", "max_tokens": 3, "ignore_eos": True}).num_output_tokens == 3

"""EngineLoop.drain in-process on the demo model: the engine's half of a graceful shutdown (issue 11, item 4).

The timing under load is tested end to end (tests/e2e/test_graceful_shutdown.py); here the two
outcomes each with a deadline that leaves no doubt: far away (everything finishes) and now
(everything still running or waiting is cancelled).
"""

from __future__ import annotations

import threading
import time

import pytest

from lepton.config import EngineConfig
from lepton.engine import LLMEngine, RequestOutput
from lepton.errors import ErrorKind, ServerShuttingDown, describe
from lepton.sampling_params import SamplingParams
from lepton.sequence import FinishReason
from lepton.serving import EngineLoop

PROMPT = "The quick brown fox jumps over the lazy dog"


class ListSink:
    def __init__(self) -> None:
        self.outputs: list[RequestOutput] = []
        self.errors: list[Exception] = []
        self.done = threading.Event()

    def send(self, output: RequestOutput) -> None:
        self.outputs.append(output)
        if output.finished:
            self.done.set()

    def send_error(self, error: Exception) -> None:
        self.errors.append(error)
        self.done.set()

    def is_cancelled(self) -> bool:
        return False

    def wait_first_token(self) -> None:
        deadline = time.monotonic() + 60
        while not self.outputs:
            assert time.monotonic() < deadline and not self.errors, self.errors
            time.sleep(0.005)


@pytest.fixture
def loop(demo_model_dir):
    # NOTE: two sequences at a time, so a third request waits in the queue
    config = EngineConfig.from_parameters({"model_dir": str(demo_model_dir), "max_num_seqs": "2"})
    engine_loop = EngineLoop(LLMEngine(config))
    yield engine_loop
    engine_loop.shutdown()


def submit(loop: EngineLoop, request_id: str, max_tokens: int) -> ListSink:
    sink = ListSink()
    loop.submit(request_id, PROMPT, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True), sink)
    return sink


def two_running_one_waiting(loop: EngineLoop, max_tokens: int) -> tuple[list[ListSink], ListSink]:
    running = [submit(loop, f"r{i}", max_tokens) for i in range(2)]
    for sink in running:
        sink.wait_first_token()
    queued = submit(loop, "queued", max_tokens)
    deadline = time.monotonic() + 60
    while loop.engine.scheduler.num_waiting == 0:  # NOTE: a read from this thread; the loop thread writes
        assert time.monotonic() < deadline
        time.sleep(0.001)
    return running, queued


def test_a_drain_lets_accepted_requests_finish_and_refuses_new_ones(loop):
    running, queued = two_running_one_waiting(loop, 200)
    loop.drain(timeout_s=600)
    late = submit(loop, "late", 4)
    assert late.done.is_set() and isinstance(late.errors[0], ServerShuttingDown)  # NOTE: at once, in submit
    assert describe(late.errors[0]) == (
        ErrorKind.BUSY, "server shutting down: not accepting new requests; retry on another server")
    report = loop.wait_drained(60)
    assert report is not None and (report.num_in_flight, report.num_cancelled) == (3, 0)
    for sink in running + [queued]:
        assert (sink.outputs[-1].finish_reason, sink.outputs[-1].num_output_tokens) == (FinishReason.LENGTH, 200)
    assert loop.engine.kv_cache.num_used_blocks == 0


def test_past_the_deadline_running_and_waiting_requests_end_cancelled(loop):
    running, queued = two_running_one_waiting(loop, 1000)
    loop.drain(timeout_s=0)
    report = loop.wait_drained(60)
    assert report is not None and (report.num_in_flight, report.num_cancelled) == (3, 3)
    for sink in running + [queued]:
        last = sink.outputs[-1]
        assert not sink.errors and last.finished and last.finish_reason == FinishReason.CANCELLED
        assert last.num_output_tokens < 1000
    assert queued.outputs[-1].num_output_tokens == 0
    assert loop.engine.kv_cache.num_used_blocks == 0 and loop.num_active == 0

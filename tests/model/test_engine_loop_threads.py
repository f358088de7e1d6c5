"""EngineLoop in-process on the demo model: what may wait on tritonserver stays off the loop thread.

Through Triton's Python backend `is_cancelled()` and every metric update are round trips to
tritonserver; the loop thread ("lepton-engine") runs the model's steps, so neither may run there.
"""

from __future__ import annotations

import threading
import time

from lepton.config import EngineConfig
from lepton.engine import EngineStats, LLMEngine, RequestOutput
from lepton.sampling_params import SamplingParams
from lepton.sequence import FinishReason
from lepton.serving import EngineLoop

PROMPT = "The quick brown fox jumps over the lazy dog"


class RecordingSink:
    """A sink that records which thread asked it what, and can be cancelled from the test."""

    def __init__(self, events: list) -> None:
        self.events = events  # NOTE: shared with the stats callback, in the order things happened
        self.outputs: list[RequestOutput] = []
        self.errors: list[Exception] = []
        self.cancelled = threading.Event()
        self.asked_on: set[str] = set()
        self.num_asked = 0
        self.done = threading.Event()

    def send(self, output: RequestOutput) -> None:
        self.outputs.append(output)
        if output.finished:
            self.events.append(("final", output.request_id))
            self.done.set()

    def send_error(self, error: Exception) -> None:
        self.errors.append(error)
        self.done.set()

    def is_cancelled(self) -> bool:
        self.asked_on.add(threading.current_thread().name)
        self.num_asked += 1
        return self.cancelled.is_set()


def wait_for(condition, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.002)


def make_loop(demo_model_dir, events: list, stats_threads: set[str]) -> EngineLoop:
    def on_stats(stats: EngineStats) -> None:
        stats_threads.add(threading.current_thread().name)
        events.append(("stats", stats.num_running, stats.kv_blocks_used))

    config = EngineConfig.from_parameters({"model_dir": str(demo_model_dir), "max_num_seqs": "4"})
    return EngineLoop(LLMEngine(config), on_stats=on_stats, cancel_poll_s=0.01)


def test_a_cancelled_client_is_found_off_the_loop_thread_and_its_request_ends_cancelled(demo_model_dir):
    events, stats_threads = [], set()
    loop = make_loop(demo_model_dir, events, stats_threads)
    try:
        params = SamplingParams(max_tokens=1000, temperature=0.0, ignore_eos=True)
        kept, cancelled = RecordingSink(events), RecordingSink(events)
        loop.submit("kept", PROMPT, SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True), kept)
        loop.submit("cancelled", PROMPT, params, cancelled)
        wait_for(lambda: cancelled.outputs or cancelled.errors)
        assert not cancelled.errors, cancelled.errors
        cancelled.cancelled.set()
        assert cancelled.done.wait(60) and kept.done.wait(60)
        last = cancelled.outputs[-1]
        assert (last.finish_reason, last.finished) == (FinishReason.CANCELLED, True)
        assert 0 < last.num_output_tokens < 1000
        assert (kept.outputs[-1].finish_reason, kept.outputs[-1].num_output_tokens) == (FinishReason.LENGTH, 24)
        assert cancelled.asked_on == {"lepton-cancel-watch"} and kept.asked_on == {"lepton-cancel-watch"}
        wait_for(lambda: loop.num_active == 0)
        assert loop.engine.kv_cache.num_used_blocks == 0
        asked = (kept.num_asked, cancelled.num_asked)
        time.sleep(0.1)  # NOTE: ten polls
        assert (kept.num_asked, cancelled.num_asked) == asked  # NOTE: finished requests are no longer watched
    finally:
        loop.shutdown()


def test_stats_are_published_by_the_sender_before_the_final_output_they_count(demo_model_dir):
    events, stats_threads = [], set()
    loop = make_loop(demo_model_dir, events, stats_threads)
    try:
        sink = RecordingSink(events)
        loop.submit("one", PROMPT, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True), sink)
        assert sink.done.wait(60)
        assert stats_threads == {"lepton-sender"}
        final = events.index(("final", "one"))
        # NOTE: the snapshot queued just before the final output already has the request finished
        assert events[final - 1] == ("stats", 0, 0)
    finally:
        loop.shutdown()

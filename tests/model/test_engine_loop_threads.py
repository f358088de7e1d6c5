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


class SlowSink(RecordingSink):
    """Sending takes 5 ms (a busy tritonserver); records how much was queued at each send."""

    def __init__(self, events: list, loop_box: list) -> None:
        super().__init__(events)
        self.loop_box, self.backlogs = loop_box, []

    def send(self, output: RequestOutput) -> None:
        self.backlogs.append(self.loop_box[0]._sender.backlog)
        time.sleep(0.005)
        super().send(output)


def test_the_loop_runs_at_most_a_few_steps_ahead_of_a_slow_sender(demo_model_dir):
    from lepton.serving import STEPS_AHEAD

    events, stats_threads, box = [], set(), []
    loop = make_loop(demo_model_dir, events, stats_threads)
    box.append(loop)
    try:
        streams, tokens = 4, 40
        sinks = [SlowSink(events, box) for _ in range(streams)]
        for i, sink in enumerate(sinks):
            loop.submit(f"s{i}", PROMPT, SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True), sink)
        assert all(sink.done.wait(60) for sink in sinks)
        assert all(sink.outputs[-1].num_output_tokens == tokens for sink in sinks)
        # NOTE: a demo step takes ~1-3 ms, sending it 20 ms: without waiting, 137 items were queued by the end.
        # The loop steps once at most STEPS_AHEAD x (streams + 1) are queued; a step adds an output per stream
        # and up to two stats snapshots.
        most = max(b for sink in sinks for b in sink.backlogs)
        assert 2 * streams <= most <= STEPS_AHEAD * (streams + 1) + streams + 2
    finally:
        loop.shutdown()

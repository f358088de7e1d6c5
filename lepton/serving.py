"""The engine loop: a background thread that owns the engine and streams outputs to sinks.

Front ends (Triton's model.py) call `submit`, `drain` and `shutdown` from any thread. Prompts are
tokenized and checked on tokenizer threads (so a long prompt never stalls the running streams); only
the loop thread touches the engine's state, so the engine and its bookkeeping need no locks.

Nothing that may wait on another process runs on the loop thread between steps: through Triton's
Python backend, asking whether a client cancelled and setting a metric are each a round trip to
tritonserver, so they run on threads of their own (a cancel watcher, the sender), overlapping the
model's steps.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Protocol

from lepton.chat import ChatPrompt
from lepton.engine import EngineStats, LLMEngine, PreparedRequest, RequestOutput
from lepton.errors import LeptonError, ServerShuttingDown
from lepton.sampling_params import SamplingParams

NUM_TOKENIZER_THREADS = 2
CANCEL_POLL_S = 0.1  # NOTE: how often every open request is asked whether its client cancelled
STEPS_AHEAD = 8  # steps of outputs the loop may have queued for sending before it waits to step again
SEND_WAIT_S = 0.25  # NOTE: the longest wait for the sender before the loop looks at its inbox again

logger = logging.getLogger(__name__)


class OutputSink(Protocol):
    """Where one request's outputs go (a Triton response sender, a test's list)."""

    def send(self, output: RequestOutput) -> None: ...

    def send_error(self, error: Exception) -> None: ...

    def is_cancelled(self) -> bool: ...


@dataclass(frozen=True)
class DrainReport:
    """What a drain found and did."""

    num_in_flight: int  # requests accepted before the drain began
    num_cancelled: int  # of those, cancelled at the deadline (finish_reason cancelled)
    seconds: float  # from the drain's start until the last response was sent


class EngineLoop:
    """Runs engine.step() while there is work; admits and cancels requests between steps."""

    def __init__(
        self,
        engine: LLMEngine,
        on_stats: Callable[[EngineStats], None] | None = None,
        stats_interval_s: float = 0.05,
        cancel_poll_s: float = CANCEL_POLL_S,
    ) -> None:
        self.engine = engine
        self._has_stats = on_stats is not None
        self._stats_interval_s = stats_interval_s
        self._stats_published_at = 0.0
        self._inbox: deque[tuple[PreparedRequest, OutputSink]] = deque()
        self._sinks: dict[str, OutputSink] = {}
        self._wake = threading.Condition()
        self._stopping = False
        self._num_preparing = 0  # NOTE: submitted, not yet in the inbox or answered (guarded by _wake)
        self._drain_started: float | None = None  # monotonic time of drain(); None: admitting
        self._drain_deadline = 0.0
        self._drain_in_flight = 0
        self._num_cancelled = 0
        self._drained = threading.Event()
        self._drained_at = 0.0
        self._to_prepare: queue.SimpleQueue = queue.SimpleQueue()
        self._preparers = [
            threading.Thread(target=self._prepare_loop, name=f"lepton-tokenizer-{i}", daemon=True)
            for i in range(NUM_TOKENIZER_THREADS)
        ]
        self._sender = _Sender(on_stats)
        self._watcher = _CancelWatcher(cancel_poll_s)
        self._thread = threading.Thread(target=self._run, name="lepton-engine", daemon=True)
        for thread in (*self._preparers, self._thread):
            thread.start()

    def submit(self, request_id: str, prompt: str | list[int] | ChatPrompt, params: SamplingParams,
               sink: OutputSink) -> None:
        """Queue a request; its outputs (or its error) arrive at sink from the engine's threads."""
        with self._wake:
            refused = self._stopping or self._drain_started is not None
            if not refused:
                self._num_preparing += 1
        if refused:
            self._send_error(sink, ServerShuttingDown())
            return
        self._to_prepare.put((request_id, prompt, params, sink))

    def drain(self, timeout_s: float) -> None:
        """Refuse new requests from now on; cancel those still running timeout_s from now."""
        with self._wake:
            if self._drain_started is None:
                self._drain_started = time.monotonic()
                self._drain_deadline = self._drain_started + timeout_s
                self._drain_in_flight = self._num_preparing + len(self._inbox) + len(self._sinks)
            self._wake.notify()

    def wait_drained(self, timeout_s: float | None = None) -> DrainReport | None:
        """After drain(): wait until every request accepted before it has been answered; None on timeout."""
        if not self._drained.wait(timeout_s):
            return None
        with self._wake:
            return DrainReport(self._drain_in_flight, self._num_cancelled, self._drained_at - self._drain_started)

    def shutdown(self, timeout: float = 10.0) -> None:
        """Cancel everything in flight and stop the threads."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        for _ in self._preparers:
            self._to_prepare.put(None)
        deadline = time.monotonic() + timeout
        for thread in (self._thread, *self._preparers):
            thread.join(max(0.0, deadline - time.monotonic()))

    def _prepare_loop(self) -> None:
        while True:
            item = self._to_prepare.get()
            if item is None:
                return
            request_id, prompt, params, sink = item
            try:
                prepared = self.engine.prepare(request_id, prompt, params)
            except Exception as exc:  # NOTE: LeptonError, or a tokenizer failure: this request alone
                if not isinstance(exc, LeptonError):
                    logger.exception("preparing %s failed", request_id)
                self._send_error(sink, exc)
                prepared = None
            with self._wake:
                self._num_preparing -= 1
                if prepared is not None and self._stopping:
                    self._send_error(sink, ServerShuttingDown())
                elif prepared is not None:
                    self._inbox.append((prepared, sink))
                self._wake.notify()

    @property
    def num_active(self) -> int:
        return len(self._sinks)

    def _run(self) -> None:
        while True:
            with self._wake:
                if not (self._inbox or self._sinks or self._stopping):
                    self._publish_stats(force=True)  # NOTE: idle: the last snapshot must be exact
                while not (self._inbox or self._sinks or self._stopping or self._just_drained()):
                    self._wake.wait()
                if self._stopping:
                    break
                drained = self._just_drained()
                arrivals = list(self._inbox)
                self._inbox.clear()
                past_deadline = self._drain_started is not None and time.monotonic() >= self._drain_deadline
            if drained:
                self._sender.flush()  # NOTE: the drain is done once the last responses are sent
                self._drained_at = time.monotonic()
                self._drained.set()
                continue
            self._admit(arrivals)
            self._reap_cancelled()
            if past_deadline:
                self._cancel_all()
            if self._sinks and self._sender.wait_backlog(STEPS_AHEAD * (len(self._sinks) + 1), SEND_WAIT_S):
                self._step()
            self._publish_stats(force=False)
        self._abort_all()

    def _just_drained(self) -> bool:
        """Draining, and every request accepted before has been answered, not yet reported (under _wake)."""
        idle = not (self._inbox or self._sinks) and self._num_preparing == 0
        return self._drain_started is not None and idle and not self._drained.is_set()

    def _cancel_all(self) -> None:
        """Past the drain deadline: every running request ends with finish_reason cancelled."""
        for request_id in list(self._sinks):
            output = self.engine.abort(request_id)
            self._num_cancelled += output is not None
            self._deliver(output)

    def _publish_stats(self, force: bool) -> None:
        """A snapshot of the engine's counters, published by the sender thread, in order with the outputs."""
        now = time.monotonic()
        if not self._has_stats or (not force and now - self._stats_published_at < self._stats_interval_s):
            return
        self._stats_published_at = now
        self._sender.put_stats(self.engine.stats())

    def _admit(self, arrivals) -> None:
        for prepared, sink in arrivals:
            try:
                self.engine.add_prepared(prepared)
            except Exception as exc:
                if not isinstance(exc, LeptonError):
                    logger.exception("admitting %s failed", prepared.request_id)
                self._send_error(sink, exc)
                continue
            self._sinks[prepared.request_id] = sink
            self._watcher.watch(prepared.request_id, sink)

    @staticmethod
    def _send_error(sink: OutputSink, error: Exception) -> None:
        try:
            sink.send_error(error)
        except Exception:  # NOTE: the client went away; nothing is left to free
            logger.exception("sending an error failed")

    def _reap_cancelled(self) -> None:
        for request_id in self._sender.take_failed():  # NOTE: the client went away mid-stream
            self._deliver(self.engine.abort(request_id))
        for request_id in self._watcher.take_cancelled():
            self._deliver(self.engine.abort(request_id))

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as exc:  # NOTE: last resort (engine.step isolates failures itself)
            logger.exception("engine step failed")
            self.engine.kv_cache.discard_pending()
            for request_id, sink in list(self._sinks.items()):
                self.engine.abort(request_id)
                self._sinks.pop(request_id)
                self._watcher.forget(request_id)
                self._sender.put_error(sink, exc)  # NOTE: after the outputs already queued
            return
        if any(output.finished for output in outputs):
            # NOTE: before the final responses go out, so a client that has its answer and then
            # reads the metrics port sees the request counted and its blocks freed.
            self._publish_stats(force=True)
        for output in outputs:
            self._deliver(output)

    def _deliver(self, output: RequestOutput | None) -> None:
        if output is None:
            return
        sink = self._sinks.get(output.request_id)
        if output.finished:
            self._sinks.pop(output.request_id, None)
            self._watcher.forget(output.request_id)
        if sink is None:
            return
        self._sender.put(sink, output)

    def _abort_all(self) -> None:
        for request_id in list(self._sinks):
            self._deliver(self.engine.abort(request_id))
        with self._wake:
            leftovers = list(self._inbox)
            self._inbox.clear()
        for _, sink in leftovers:
            self._send_error(sink, ServerShuttingDown())
        self._watcher.stop()
        self._sender.stop()


class _CancelWatcher:
    """Asks each open request's sink whether its client cancelled, every poll_s, on a thread of its own.

    The loop thread takes what it found between steps (`take_cancelled`). Through Triton each question
    is a round trip to tritonserver; asked of every stream before every step on the loop thread, the
    questions took ~5 % of its time at 16 streams (docs/performance.md).
    """

    def __init__(self, poll_s: float) -> None:
        self._poll_s = poll_s
        self._sinks: dict[str, OutputSink] = {}
        self._cancelled: list[str] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lepton-cancel-watch", daemon=True)
        self._thread.start()

    def watch(self, request_id: str, sink: OutputSink) -> None:
        with self._lock:
            self._sinks[request_id] = sink

    def forget(self, request_id: str) -> None:
        with self._lock:
            self._sinks.pop(request_id, None)

    def take_cancelled(self) -> list[str]:
        """Requests whose client cancelled since the last call (each reported once)."""
        with self._lock:
            cancelled, self._cancelled = self._cancelled, []
        return cancelled

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stopping.wait(self._poll_s):
            with self._lock:
                watched = list(self._sinks.items())
            found = [request_id for request_id, sink in watched if self._is_cancelled(request_id, sink)]
            if found:
                with self._lock:
                    for request_id in found:
                        if self._sinks.pop(request_id, None) is not None:  # NOTE: not finished meanwhile
                            self._cancelled.append(request_id)

    @staticmethod
    def _is_cancelled(request_id: str, sink: OutputSink) -> bool:
        try:
            return sink.is_cancelled()
        except Exception:  # NOTE: a sink that cannot tell has lost its client: stop the request
            logger.exception("asking whether %s was cancelled failed", request_id)
            return True


@dataclass(frozen=True)
class _Stats:
    """A stats snapshot queued for publishing between the outputs sent before and after it."""

    stats: EngineStats


class _Sender:
    """Sends outputs to their sinks, and publishes stats, in order, on a thread of its own.

    Building and sending a Triton response per stream per token takes a few ms a step, and setting
    Triton's metrics is a round trip to tritonserver per value; here they overlap the next model
    step (the runners release the GIL) instead of adding to it. The loop waits for it when it is
    STEPS_AHEAD steps behind (wait_backlog): a model whose steps are shorter than their sending would
    otherwise queue responses without bound, and clients and the metrics port would fall ever further
    behind the engine.
    """

    def __init__(self, on_stats: Callable[[EngineStats], None] | None = None) -> None:
        self._on_stats = on_stats
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._backlog = 0  # NOTE: items put and not yet handled (guarded by _handled)
        self._handled = threading.Condition()
        self._failed: list[str] = []  # NOTE: appended here, taken by the engine thread
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="lepton-sender", daemon=True)
        self._thread.start()

    def put(self, sink: OutputSink, output: RequestOutput) -> None:
        self._put((sink, output, output.error))

    def put_error(self, sink: OutputSink, error: Exception) -> None:
        self._put((sink, None, error))

    def put_stats(self, stats: EngineStats) -> None:
        self._put(_Stats(stats))

    @property
    def backlog(self) -> int:
        """Outputs, errors and stats snapshots queued and not yet sent."""
        with self._handled:
            return self._backlog

    def wait_backlog(self, limit: int, timeout: float) -> bool:
        """Wait until at most limit items are queued; False if still more after timeout seconds."""
        with self._handled:
            return self._handled.wait_for(lambda: self._backlog <= limit, timeout)

    def _put(self, item) -> None:
        with self._handled:
            self._backlog += 1
        self._queue.put(item)

    def take_failed(self) -> list[str]:
        """Requests whose sending failed (the client went away) since the last call."""
        with self._lock:
            failed, self._failed = self._failed, []
        return failed

    def stop(self, timeout: float = 10.0) -> None:
        """Send what is queued, then end the thread."""
        self._queue.put(None)
        self._thread.join(timeout)

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until what is queued now has been sent; False on timeout."""
        sent = threading.Event()
        self._queue.put(sent)
        return sent.wait(timeout)

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            if isinstance(item, threading.Event):
                item.set()
                continue
            try:
                self._handle(item)
            finally:
                with self._handled:
                    self._backlog -= 1
                    self._handled.notify_all()

    def _handle(self, item) -> None:
        if isinstance(item, _Stats):
            self._publish(item.stats)
            return
        sink, output, error = item
        if error is not None:
            EngineLoop._send_error(sink, error)
            return
        try:
            sink.send(output)
        except Exception:  # NOTE: the client went away; the engine thread aborts the request
            logger.exception("sending output of %s failed", output.request_id)
            if not output.finished:
                with self._lock:
                    self._failed.append(output.request_id)

    def _publish(self, stats: EngineStats) -> None:
        try:
            self._on_stats(stats)
        except Exception:  # NOTE: metrics must never take the engine down
            logger.exception("publishing engine stats failed")

"""Triton Python backend (decoupled) for Lepton: translates requests and hands them to the engine."""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from lepton.config import EngineConfig
from lepton.engine import EngineStats, LLMEngine, RequestOutput
from lepton.errors import InvalidRequest, describe
from lepton.instances import CPU, instance_config, pin_process, placement_of
from lepton.lifetime import exit_with_parent
from lepton.protocol import convert_request, logprobs_json
from lepton.serving import EngineLoop
from lepton.shutdown import DrainWatcher
from lepton.triton_errors import triton_error

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
# NOTE: every call into the stub from a thread of ours (responses, cancellation checks, metrics) goes
# through this lock, one at a time: tritonserver 2.51 died with SIGSEGV in libtriton_python.so (the stub
# then with boost::interprocess::lock_exception) when several threads sent at once (docs/performance.md,
# 2026-12-05 02:28). It also orders a request's last response before any later question about it: asked
# whether a request was cancelled after its final response was sent, tritonserver reads the freed response
# factory (SIGSEGV in TRITONBACKEND_ResponseFactoryIsCancelled; `make test`'s cancel storm, 2026-12-05).
STUB = threading.Lock()


class TritonPythonModel:
    def initialize(self, args):
        self.logger = pb_utils.Logger
        exit_with_parent()  # NOTE: this stub must not outlive tritonserver
        model_config = json.loads(args["model_config"])
        if not pb_utils.using_decoupled_model_transaction_policy(model_config):
            raise pb_utils.TritonModelException("the lepton model must be decoupled")
        params = {k: v["string_value"] for k, v in model_config.get("parameters", {}).items()}
        model_dir = Path(args["model_repository"])
        placement = placement_of(args, model_config, sorted(os.sched_getaffinity(0)))
        if placement.kind == CPU and placement.cpu_share > 1:
            pin_process(placement.cpu_cores)  # NOTE: before the runner starts its compute threads
        self.config = instance_config(EngineConfig.from_parameters(params, base_dir=model_dir), placement)
        self.metrics = Metrics(labels={"engine": placement.label})
        self.engine_loop = EngineLoop(LLMEngine(self.config), on_stats=self.metrics.publish)
        # NOTE: the launcher's graceful shutdown (lepton/shutdown.py) asks through a file in model_dir
        self.drain_watcher = DrainWatcher(model_dir, args["model_instance_name"], self.engine_loop)
        self.logger.log_info(f"lepton: {args['model_instance_name']}: {placement.describe()}, "
                             f"{self.config.runner.compute_threads} threads, KV cache "
                             f"{self.config.cache.kv_cache_memory_bytes >> 20} MiB, serving {self.config.model_dir}")

    def execute(self, requests):
        for request in requests:
            with STUB:  # NOTE: the request read out of the stub beside our other threads' calls
                sender = request.get_response_sender()
                inputs = {t.name(): t.as_numpy() for t in request.inputs()}
                raw_parameters, given_id = request.parameters(), request.request_id()
            try:
                parameters = json.loads(raw_parameters or "{}")
                parsed = convert_request(inputs, self.config.default_max_tokens, parameters, self.config.limits)
            except Exception as exc:  # NOTE: never a traceback to the client, never the whole batch
                with STUB:
                    if not isinstance(exc, InvalidRequest):
                        self.logger.log_error(f"lepton: parsing a request failed: {exc!r}")
                        exc = InvalidRequest("request", "could not be parsed")
                    sender.send(pb_utils.InferenceResponse(error=_error(exc)), flags=FINAL)
                continue
            request_id = f"{given_id or 'req'}-{uuid.uuid4().hex[:12]}"
            sink = TritonSink(sender, parsed, self.metrics, self.config.stream_interval)
            self.engine_loop.submit(request_id, parsed.prompt, parsed.params, sink)
        return None

    def finalize(self):
        self.drain_watcher.stop()
        self.engine_loop.shutdown()


class Metrics:
    """EngineStats as Triton custom metrics on the metrics port (lepton_* families).

    Every instance of the model adds its own series to the same families, told apart by its labels
    (`engine`); the server's figure is their sum (`sum without (engine) (...)`).
    """

    GAUGES = {
        "num_running": "Requests running (holding KV blocks)",
        "num_waiting": "Requests waiting for admission",
        "kv_blocks_used": "KV cache blocks in use",
        "kv_blocks_total": "KV cache blocks in the pool",
    }
    COUNTERS = {
        "prefix_cache_queries": "Prompt tokens looked up in the prefix cache",
        "prefix_cache_hits": "Prompt tokens found in the prefix cache",
        "num_preemptions": "Sequences preempted (recomputed later)",
        "prompt_tokens": "Prompt tokens of admitted requests",
        "generated_tokens": "Generated tokens",
        "computed_tokens": "Tokens run through the model (prefix-cache hits excluded)",
    }

    def __init__(self, labels: dict[str, str]) -> None:
        self.labels = labels
        self.families = []  # NOTE: a MetricFamily must outlive its Metric objects
        gauge, counter = pb_utils.MetricFamily.GAUGE, pb_utils.MetricFamily.COUNTER
        self.gauges = {k: self._metric(k, d, gauge) for k, d in self.GAUGES.items()}
        self.counters = {k: self._metric(f"{k}_total", d, counter) for k, d in self.COUNTERS.items()}
        self.usage = self._metric("kv_cache_usage", "Fraction of KV cache blocks in use", gauge)
        self.last = {k: 0 for k in self.COUNTERS}
        self.gauge_values: dict[str, float] = {}  # NOTE: as last set; a gauge not yet set reads 0
        histogram = pb_utils.MetricFamily.HISTOGRAM
        self.ttft = self._metric("time_to_first_token_seconds", "Request arrival to first token", histogram,
                                 buckets=[0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30])
        self.itl = self._metric("inter_token_latency_seconds", "Time between generated tokens", histogram,
                                buckets=[0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1])

    def _metric(self, name, doc, kind, **options):
        self.families.append(pb_utils.MetricFamily(name=f"lepton_{name}", description=doc, kind=kind))
        return self.families[-1].Metric(labels=self.labels, **options)

    def publish(self, stats: EngineStats) -> None:
        """Sends what changed since the last snapshot only: each set or increment is a round trip to tritonserver."""
        with STUB:
            self._publish(stats)

    def _publish(self, stats: EngineStats) -> None:
        for name, gauge in self.gauges.items():
            self._set(name, gauge, getattr(stats, name))
        self._set("kv_cache_usage", self.usage, stats.kv_blocks_used / max(stats.kv_blocks_total, 1))
        for name, counter in self.counters.items():
            value = getattr(stats, name)
            if value != self.last[name]:
                counter.increment(value - self.last[name])
                self.last[name] = value

    def _set(self, name: str, gauge, value: float) -> None:
        if self.gauge_values.get(name) != value:
            gauge.set(value)
            self.gauge_values[name] = value


class TritonSink:
    """Sends one request's outputs as Triton responses: deltas when streaming (the first token at once, then
    every stream_interval tokens, the rest with the final response), else one response."""

    def __init__(self, sender, parsed, metrics: Metrics, stream_interval: int = 1) -> None:
        self.sender, self.stream, self.metrics = sender, parsed.stream, metrics
        self.stream_interval, self.sent_tokens = stream_interval, 0
        # NOTE: a conversation (`messages`) is never echoed: only text_input is put before the output.
        echo = not (parsed.stream or parsed.exclude_input_in_output) and isinstance(parsed.prompt, str)
        self.text = parsed.prompt if echo else ""
        self.logprobs = [] if parsed.params.logprobs is not None else None  # pending, not yet sent
        self.last_time, self.num_tokens = time.monotonic(), 0
        self.closed = False  # NOTE: the final response was sent: the sender must not be used again

    def is_cancelled(self) -> bool:
        with STUB:
            return not self.closed and self.sender.is_cancelled()

    def send(self, output: RequestOutput) -> None:
        with STUB:
            if not self.closed:
                self._send_output(output)

    def _send_output(self, output: RequestOutput) -> None:
        self._observe(output)
        if self.logprobs is not None:
            self.logprobs += output.logprobs
        self.text += output.text
        if self.stream:
            due = self.sent_tokens == 0 or output.num_output_tokens - self.sent_tokens >= self.stream_interval
            if (self.text and due) or output.finished:
                self.sent_tokens = output.num_output_tokens
                text, self.text = self.text, ""
                self._send(text, output)
            return
        if output.finished:
            self._send(self.text, output)

    def _send(self, text: str, output: RequestOutput) -> None:
        response = _response(text, output, self.logprobs)
        if self.logprobs is not None:
            self.logprobs = []
        try:
            self.sender.send(response, flags=FINAL if output.finished else 0)
        finally:  # NOTE: a final response that failed to go out closes the sender too
            self.closed = output.finished

    def _observe(self, output: RequestOutput) -> None:
        new_tokens = output.num_output_tokens - self.num_tokens
        if new_tokens <= 0:
            return
        now = time.monotonic()
        if self.num_tokens == 0:
            self.metrics.ttft.observe(now - self.last_time)
        else:
            self.metrics.itl.observe((now - self.last_time) / new_tokens)
        self.last_time, self.num_tokens = now, output.num_output_tokens

    def send_error(self, error: Exception) -> None:
        with STUB:
            if not self.closed:
                self.closed = True
                self.sender.send(pb_utils.InferenceResponse(error=_error(error)), flags=FINAL)


def _response(text: str, output: RequestOutput, logprobs: list | None):
    reason = str(output.finish_reason) if output.finish_reason else ""
    extra = [] if logprobs is None else [_string_tensor("logprobs", json.dumps(logprobs_json(logprobs)))]
    return pb_utils.InferenceResponse(output_tensors=extra + [
        pb_utils.Tensor("text_output", np.array([text.encode("utf-8")], dtype=np.object_)),
        pb_utils.Tensor("finish_reason", np.array([reason.encode("utf-8")], dtype=np.object_)),
        pb_utils.Tensor("num_input_tokens", np.array([output.num_input_tokens], dtype=np.int32)),
        pb_utils.Tensor("num_output_tokens", np.array([output.num_output_tokens], dtype=np.int32)),
    ])


def _string_tensor(name: str, text: str):
    return pb_utils.Tensor(name, np.array([text.encode("utf-8")], dtype=np.object_))


def _error(exc: Exception):
    return triton_error(*describe(exc))

"""Load generator: one gRPC stream per request on one asyncio loop, timestamps per response."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import numpy as np
import tritonclient.grpc.aio as grpcaio
from tritonclient.grpc import InferInput

from benchmarks.workload import RequestSpec

MODEL = "lepton"


@dataclass
class RequestRecord:
    """What the client saw of one request; times are time.perf_counter() seconds."""

    spec: RequestSpec
    sent_s: float = 0.0
    # NOTE: one (arrival time, num_output_tokens so far, text length) per response that carried
    # tensors; a response may cover several tokens when the detokenizer held text back.
    responses: list[tuple[float, int, int]] = field(default_factory=list)
    done_s: float = 0.0
    num_input_tokens: int = 0
    finish_reason: str = ""
    error: str = ""

    @property
    def num_output_tokens(self) -> int:
        return self.responses[-1][1] if self.responses else 0

    @property
    def first_token_s(self) -> float | None:
        """Arrival of the first response carrying text (the first non-empty response)."""
        return next((t for t, n, chars in self.responses if chars > 0), None)


class InFlight:
    """Requests sent and not finished, with tokens received so far (read by the metrics sampler)."""

    def __init__(self) -> None:
        self.tokens: dict[str, tuple[int, int]] = {}  # request id -> (prompt tokens, output tokens)

    def snapshot(self) -> list[tuple[int, int]]:
        return list(self.tokens.values())


def make_inputs(spec: RequestSpec) -> list[InferInput]:
    """Tensor-style inputs: greedy, ignore_eos, exactly max_tokens new tokens, streamed."""
    fields = {
        "text_input": np.array([spec.prompt.encode()], dtype=np.object_),
        "max_tokens": np.array([spec.max_tokens], dtype=np.int32),
        "temperature": np.array([0.0], dtype=np.float32),
        "ignore_eos": np.array([True]),
        "stream": np.array([True]),
    }
    types = {np.object_: "BYTES", np.int32: "INT32", np.float32: "FP32", np.bool_: "BOOL"}
    inputs = []
    for name, array in fields.items():
        tensor = InferInput(name, list(array.shape), types[array.dtype.type])
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


async def send_one(client: grpcaio.InferenceServerClient, spec: RequestSpec, inflight: InFlight) -> RequestRecord:
    """Send spec on a stream of its own and record every response until the final one."""
    record = RequestRecord(spec)
    finished = asyncio.Event()
    request = {
        "model_name": MODEL, "inputs": make_inputs(spec), "request_id": spec.request_id,
        "parameters": {"triton_enable_empty_final_response": True},
    }

    async def requests():
        yield request
        await finished.wait()  # NOTE: keep the stream open until the last response came back

    inflight.tokens[spec.request_id] = (spec.num_prompt_tokens, 0)
    record.sent_s = time.perf_counter()
    try:
        async for result, error in client.stream_infer(requests()):
            now = time.perf_counter()
            if error is not None:
                record.error = str(error)
                break
            _add_response(record, result, now)
            inflight.tokens[spec.request_id] = (spec.num_prompt_tokens, record.num_output_tokens)
            if result.get_response().parameters["triton_final_response"].bool_param:
                break
    except Exception as exc:  # NOTE: a failed request is reported, not fatal to the run
        record.error = f"{type(exc).__name__}: {exc}"
    record.done_s = time.perf_counter()
    finished.set()
    inflight.tokens.pop(spec.request_id, None)
    return record


def _add_response(record: RequestRecord, result, now: float) -> None:
    text = result.as_numpy("text_output")
    if text is None:
        return  # the empty final response
    record.responses.append((now, int(result.as_numpy("num_output_tokens")[0]), len(text[0])))
    record.num_input_tokens = int(result.as_numpy("num_input_tokens")[0])
    reason = result.as_numpy("finish_reason")[0]
    if reason:
        record.finish_reason = reason.decode()


async def closed_loop(url: str, specs: list[RequestSpec], concurrency: int, inflight: InFlight) -> list[RequestRecord]:
    """Keep `concurrency` requests in flight until every spec was sent; records in spec order."""
    async with grpcaio.InferenceServerClient(url) as client:
        queue: asyncio.Queue = asyncio.Queue()
        for index, spec in enumerate(specs):
            queue.put_nowait((index, spec))
        records: list[RequestRecord | None] = [None] * len(specs)

        async def worker():
            while not queue.empty():
                index, spec = queue.get_nowait()
                records[index] = await send_one(client, spec, inflight)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return records


async def open_loop(url: str, specs: list[RequestSpec], inflight: InFlight) -> list[RequestRecord]:
    """Send each spec at its arrival_s after the start, whatever is still in flight."""
    async with grpcaio.InferenceServerClient(url) as client:
        start = time.perf_counter()

        async def delayed(spec: RequestSpec) -> RequestRecord:
            await asyncio.sleep(max(0.0, start + spec.arrival_s - time.perf_counter()))
            return await send_one(client, spec, inflight)

        return list(await asyncio.gather(*(delayed(s) for s in specs)))



async def closed_loop_with(send, specs: list[RequestSpec], concurrency: int) -> list[RequestRecord]:
    """closed_loop for any client: `send(spec)` is a coroutine returning the spec's RequestRecord."""
    queue: asyncio.Queue = asyncio.Queue()
    for index, spec in enumerate(specs):
        queue.put_nowait((index, spec))
    records: list[RequestRecord | None] = [None] * len(specs)

    async def worker():
        while not queue.empty():
            index, spec = queue.get_nowait()
            records[index] = await send(spec)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return records


async def open_loop_with(send, specs: list[RequestSpec]) -> list[RequestRecord]:
    """open_loop for any client: each spec is sent at its arrival_s after the start."""
    start = time.perf_counter()

    async def delayed(spec: RequestSpec) -> RequestRecord:
        await asyncio.sleep(max(0.0, start + spec.arrival_s - time.perf_counter()))
        return await send(spec)

    return list(await asyncio.gather(*(delayed(s) for s in specs)))

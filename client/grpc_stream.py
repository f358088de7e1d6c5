"""Generation over gRPC: one request on a bi-directional stream, responses turned into Chunks."""

from __future__ import annotations

import queue
import time
import uuid
from typing import Iterator

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from client.chunk import Chunk
from client.errors import ConnectionFailed, RequestTimeout, ServerError

# NOTE: Triton datatypes of the model's inputs (model_repository/lepton/config.pbtxt).
INPUT_TYPES = {
    "text_input": ("BYTES", np.object_),
    "stream": ("BOOL", np.bool_),
    "exclude_input_in_output": ("BOOL", np.bool_),
    "max_tokens": ("INT32", np.int32),
    "temperature": ("FP32", np.float32),
    "top_p": ("FP32", np.float32),
    "top_k": ("INT32", np.int32),
    "seed": ("UINT64", np.uint64),
    "stop": ("BYTES", np.object_),
    "ignore_eos": ("BOOL", np.bool_),
}
ERROR_WAIT_S = 2.0  # how long to wait for the reason after the stream refused a request


def stream_generate(url: str, model: str, fields: dict, timeout: float | None = None,
                    request_id: str | None = None) -> Iterator[Chunk]:
    """Send one request on a new stream and yield its Chunks; closing early cancels the request."""
    client = grpcclient.InferenceServerClient(url)
    responses: queue.Queue = queue.Queue()
    finished = False
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        _start(client, responses, url)
        _send(client, model, fields, request_id or uuid.uuid4().hex, responses, url)
        while not finished:
            result = _next_result(responses, deadline, timeout, url)
            finished = _is_final(result)
            chunk = _chunk(result)
            if chunk is not None:
                yield chunk
    finally:
        _close(client, cancel=not finished)


def to_inputs(fields: dict) -> list[grpcclient.InferInput]:
    """Request fields as InferInputs of the model's datatypes (scalars as shape [1])."""
    inputs = []
    for name, value in fields.items():
        datatype, dtype = INPUT_TYPES[name]
        values = value if isinstance(value, list) else [value]
        if dtype is np.object_:
            values = [v.encode("utf-8") for v in values]
        array = np.array(values, dtype=dtype)
        infer_input = grpcclient.InferInput(name, list(array.shape), datatype)
        infer_input.set_data_from_numpy(array)
        inputs.append(infer_input)
    return inputs


def _start(client, responses: queue.Queue, url: str) -> None:
    try:
        client.start_stream(lambda result, error: responses.put((result, error)))
    except InferenceServerException as exc:
        raise _client_error(exc, url) from None


def _send(client, model: str, fields: dict, request_id: str, responses: queue.Queue, url: str) -> None:
    try:
        client.async_stream_infer(model, to_inputs(fields), request_id=request_id,
                                  enable_empty_final_response=True)
    except InferenceServerException as exc:
        # NOTE: when the stream already failed (server unreachable), tritonclient raises a generic
        # "stream is no longer in valid state"; the real reason went to the callback.
        try:
            _, error = responses.get(timeout=ERROR_WAIT_S)
        except queue.Empty:
            error = None
        raise _client_error(error or exc, url) from None


def _next_result(responses: queue.Queue, deadline: float | None, timeout: float | None, url: str):
    remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
    try:
        result, error = responses.get(timeout=remaining)
    except queue.Empty:
        raise RequestTimeout(f"no complete answer within {timeout:g} s; request cancelled") from None
    if error is not None:
        raise _client_error(error, url)
    return result


def _is_final(result) -> bool:
    return result.get_response().parameters["triton_final_response"].bool_param


def _chunk(result) -> Chunk | None:
    """The Chunk a response carries, or None for an empty final response."""
    text = result.as_numpy("text_output")
    if text is None:
        return None
    reason = result.as_numpy("finish_reason")
    return Chunk(
        text="".join(_decode(t) for t in text.reshape(-1)),
        finish_reason=_decode(reason.reshape(-1)[0]) if reason is not None and reason.size else "",
        num_input_tokens=_first_int(result.as_numpy("num_input_tokens")),
        num_output_tokens=_first_int(result.as_numpy("num_output_tokens")),
    )


def _decode(value) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _first_int(array) -> int:
    return int(array.reshape(-1)[0]) if array is not None and array.size else 0


def _client_error(error: InferenceServerException, url: str) -> Exception:
    status = error.status()
    if status == "StatusCode.UNAVAILABLE":
        return ConnectionFailed(f"cannot reach {url} over gRPC: {error.message()}")
    return ServerError(error.message(), status)


def _close(client, cancel: bool) -> None:
    """Stop the stream (cancelling an unfinished request) and close the channel."""
    try:
        client.stop_stream(cancel_requests=cancel)
    finally:
        client.close()

"""Lepton's Triton model through Triton's gRPC client: one streaming request per generation.

Every generation is its own gRPC `ModelStreamInfer` call on one shared channel, so cancelling that
call (a client gone, an error) cancels exactly that request inside Triton, which frees its KV blocks.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator

import grpc
import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
from tritonclient.utils import InferenceServerException

from openai_api.errors import ApiError, from_triton_message, internal, unavailable

# NOTE: Triton datatypes of the inputs this service sends (model_repository/lepton/config.pbtxt).
_BOOL_INPUTS = ("stream", "exclude_input_in_output")
_TEXT_INPUTS = ("text_input", "messages", "sampling_parameters")


@dataclass(frozen=True)
class Delta:
    """One Triton response: new text, and on the last one the finish reason and token counts."""

    text: str
    finish_reason: str  # "stop" or "length" on the last response; "" before
    num_input_tokens: int
    num_output_tokens: int
    logprobs: list[dict] = field(default_factory=list)  # Lepton's logprobs entries of this response's tokens


@dataclass(frozen=True)
class ModelInfo:
    """What the service learns from the Triton model's config at start."""

    input_names: frozenset[str]
    model_dir: Path | None  # the served folder, from the `model_dir` parameter, if it is on this machine

    @property
    def supports_chat(self) -> bool:
        return "messages" in self.input_names


def fetch_model_info(url: str, model: str, timeout_s: float) -> ModelInfo:
    """Wait until Triton serves `model` (at most timeout_s), then read its config."""
    client = grpcclient.InferenceServerClient(url)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            try:
                if client.is_model_ready(model):
                    break
                reason = f"model {model!r} is not ready"
            except InferenceServerException as exc:
                reason = exc.message()
            if time.monotonic() > deadline:
                raise RuntimeError(f"Triton at {url} does not serve {model!r} after {timeout_s:g} s: {reason}")
            time.sleep(0.5)
        config = client.get_model_config(model, as_json=True)["config"]
    finally:
        client.close()
    model_dir = config.get("parameters", {}).get("model_dir", {}).get("string_value")
    return ModelInfo(
        input_names=frozenset(i["name"] for i in config.get("input", [])),
        model_dir=Path(model_dir) if model_dir and Path(model_dir).is_dir() else None,
    )


class TritonBackend:
    """An asyncio gRPC client of one decoupled Triton model; open() inside the serving event loop."""

    def __init__(self, url: str, model: str) -> None:
        self.url, self.model = url, model
        self._client: grpcaio.InferenceServerClient | None = None

    async def open(self) -> None:
        self._client = grpcaio.InferenceServerClient(self.url)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()

    async def is_ready(self) -> bool:
        try:
            return await self._client.is_model_ready(self.model)
        except (InferenceServerException, grpc.RpcError):
            return False

    async def generate(self, fields: dict, request_id: str) -> AsyncIterator[Delta]:
        """Send one request; yield its Deltas. Closing the iterator early cancels the Triton request."""
        request = {"model_name": self.model, "inputs": to_inputs(fields), "request_id": request_id,
                   "parameters": {"triton_enable_empty_final_response": True}}

        async def requests():
            yield request  # NOTE: then the client half-closes; Triton still sends every response

        responses = self._client.stream_infer(requests())
        finished = False
        try:
            async for result, error in responses:
                if error is not None:
                    finished = True
                    raise from_triton_message(error.message())
                finished = result.get_response().parameters["triton_final_response"].bool_param
                delta = to_delta(result)
                if delta is not None:
                    yield delta
                if finished:
                    return
            raise internal("Triton closed the stream before the last response")
        except grpc.RpcError as exc:
            finished = True
            raise _rpc_error(exc, self.url) from None
        finally:
            if not finished:
                responses.cancel()


def to_inputs(fields: dict) -> list[grpcclient.InferInput]:
    """Request fields as InferInputs: strings as BYTES [1], booleans as BOOL [1]."""
    inputs = []
    for name, value in fields.items():
        if name in _TEXT_INPUTS:
            array, datatype = np.array([value.encode("utf-8")], dtype=np.object_), "BYTES"
        elif name in _BOOL_INPUTS:
            array, datatype = np.array([value], dtype=np.bool_), "BOOL"
        else:
            raise ValueError(f"no Triton input {name!r}")
        tensor = grpcclient.InferInput(name, [1], datatype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def to_delta(result) -> Delta | None:
    """The Delta a response carries; None for an empty final response."""
    text = result.as_numpy("text_output")
    if text is None:
        return None
    logprobs = result.as_numpy("logprobs")
    return Delta(
        text="".join(_decode(t) for t in text.reshape(-1)),
        finish_reason=_first_text(result.as_numpy("finish_reason")),
        num_input_tokens=_first_int(result.as_numpy("num_input_tokens")),
        num_output_tokens=_first_int(result.as_numpy("num_output_tokens")),
        logprobs=json.loads(_first_text(logprobs)) if logprobs is not None and logprobs.size else [],
    )


def _decode(value) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _first_text(array) -> str:
    return _decode(array.reshape(-1)[0]) if array is not None and array.size else ""


def _first_int(array) -> int:
    return int(array.reshape(-1)[0]) if array is not None and array.size else 0


def _rpc_error(exc: grpc.RpcError, url: str) -> ApiError:
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else str(exc)
    if code == grpc.StatusCode.UNAVAILABLE:
        return unavailable(f"Triton is not reachable at {url}: {details}", code="backend_unavailable")
    return internal(f"Triton request failed ({code}): {details}")

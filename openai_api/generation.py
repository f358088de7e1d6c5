"""What completions and chat share: the service's state, waiting for a whole answer, SSE streams."""

from __future__ import annotations

import asyncio
import json
import logging
from contextlib import aclosing
from dataclasses import dataclass
from typing import AsyncIterator, Awaitable, Protocol, TypeVar

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from openai_api.errors import ApiError, internal, model_not_found
from openai_api.logprobs import TokenTexts
from openai_api.triton import Delta, ModelInfo, TritonBackend

logger = logging.getLogger("openai_api")
DONE = "data: [DONE]\n\n"
CLIENT_CLOSED_REQUEST = 499  # NOTE: nginx's status for a client that left; nobody reads it
T = TypeVar("T")


@dataclass
class Service:
    """Per-server state the endpoints share."""

    backend: TritonBackend
    model_info: ModelInfo
    served_model_name: str
    tokens: TokenTexts
    created: int  # when the service started: the model's `created`

    def check_model(self, model: str) -> None:
        if model != self.served_model_name:
            raise model_not_found(model, self.served_model_name)


class Chunks(Protocol):
    """Turns a request's Deltas into the chunks of one endpoint's stream."""

    def opening(self) -> list[dict]: ...

    def delta(self, delta: Delta) -> list[dict]: ...

    def usage(self, delta: Delta) -> dict: ...


def usage(last: Delta) -> dict:
    """OpenAI's `usage` from the token counts of the last response."""
    return {"prompt_tokens": last.num_input_tokens, "completion_tokens": last.num_output_tokens,
            "total_tokens": last.num_input_tokens + last.num_output_tokens}


def finish_reason(delta: Delta) -> str | None:
    return delta.finish_reason or None


async def start(request: Request, backend: TritonBackend, fields: dict,
                request_id: str) -> tuple[Delta, AsyncIterator[Delta]] | None:
    """Send a request and wait for its first response, so that a refused request gets an HTTP error
    status, not a broken stream; None when the client disconnected first (the request is then cancelled)."""
    deltas = backend.generate(fields, request_id)

    async def first() -> Delta:
        try:
            return await anext(deltas)
        except StopAsyncIteration:
            raise internal("Triton sent no response") from None

    try:
        delta = await until_disconnected(request, first(), request_id)
    except BaseException:
        await deltas.aclose()
        raise
    if delta is None:
        await deltas.aclose()
        return None
    return delta, deltas


async def collect(request: Request, backend: TritonBackend, fields: dict, request_id: str) -> list[Delta] | None:
    """Every Delta of a request; None when the client disconnected first (the request is then cancelled)."""
    async def run() -> list[Delta]:
        async with aclosing(backend.generate(fields, request_id)) as deltas:
            return [delta async for delta in deltas]

    return await until_disconnected(request, run(), request_id)


async def until_disconnected(request: Request, work: Awaitable[T], request_id: str) -> T | None:
    """work's result, or None if the client disconnects first; work is then cancelled (and with it the
    gRPC stream, which cancels the request in Triton). uvicorn does not cancel a handler on its own."""
    task, gone = asyncio.ensure_future(work), asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        logger.info("client left before %s finished; cancelling it", request_id)
        return None
    finally:
        gone.cancel()
        task.cancel()  # NOTE: a no-op when done
        await asyncio.gather(task, gone, return_exceptions=True)  # NOTE: its generator is free again after this


async def _disconnected(request: Request) -> None:
    """Return when the client disconnects (the body was read already, so receive waits for that)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def client_gone() -> Response:
    return Response(status_code=CLIENT_CLOSED_REQUEST)


def sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def event_stream(first: Delta, deltas: AsyncIterator[Delta], chunks: Chunks, include_usage: bool) -> StreamingResponse:
    """An SSE response: the chunks of each Delta, an optional usage chunk, then [DONE].

    A client that disconnects cancels the body's task; the CancelledError closes `deltas`, whose
    gRPC stream is then cancelled, and Triton aborts the request.
    """
    async def events() -> AsyncIterator[str]:
        async with aclosing(deltas):
            try:
                for chunk in chunks.opening() + chunks.delta(first):
                    yield sse(chunk)
                last = first
                async for last in deltas:
                    for chunk in chunks.delta(last):
                        yield sse(chunk)
                if include_usage:
                    yield sse(chunks.usage(last))
            except ApiError as exc:
                yield sse(exc.body())
            except Exception as exc:  # NOTE: the status is sent already: report in the stream
                logger.exception("stream failed")
                yield sse(internal(f"internal error: {exc}").body())
        yield DONE

    return _ClosingStreamingResponse(events(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


class _ClosingStreamingResponse(StreamingResponse):
    """Closes its body when the response ends however it ends (a failed send leaves it suspended)."""

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()

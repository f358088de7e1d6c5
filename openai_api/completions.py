"""POST /v1/completions: a prompt in, text out (OpenAI's legacy completions)."""

from __future__ import annotations

import json
import time
import uuid

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from openai_api.generation import Service, client_gone, collect, event_stream, finish_reason, start, usage
from openai_api.logprobs import completion_logprobs
from openai_api.schema import CompletionRequest
from openai_api.triton import Delta


async def create_completion(body: CompletionRequest, request: Request, service: Service) -> Response:
    service.check_model(body.model)
    body.check()
    fields = {"text_input": body.prompt_text, "stream": True, "exclude_input_in_output": True,
              "sampling_parameters": json.dumps(body.sampling_parameters())}
    chunks = CompletionChunks(f"cmpl-{uuid.uuid4().hex}", int(time.time()), service,
                              with_logprobs=body.logprobs is not None, include_usage=body.include_usage)
    if body.stream:
        started = await start(request, service.backend, fields, chunks.id)
        return client_gone() if started is None else event_stream(*started, chunks, body.include_usage)
    deltas = await collect(request, service.backend, fields, chunks.id)
    return client_gone() if deltas is None else JSONResponse(chunks.whole(deltas))


class CompletionChunks:
    """Completion objects of one request: the whole answer, or stream chunks (`text_completion` both)."""

    def __init__(self, id_: str, created: int, service: Service, with_logprobs: bool, include_usage: bool) -> None:
        self.id, self.created, self.service = id_, created, service
        self.with_logprobs, self.include_usage = with_logprobs, include_usage
        self.text_offset = 0  # characters of completion text streamed so far

    def _object(self, choices: list[dict], **extra) -> dict:
        return {"id": self.id, "object": "text_completion", "created": self.created,
                "model": self.service.served_model_name, "choices": choices, "system_fingerprint": None, **extra}

    def _choice(self, text: str, logprob_entries: list[dict], reason: str | None) -> dict:
        logprobs = None
        if self.with_logprobs:
            logprobs = completion_logprobs(logprob_entries, self.service.tokens, self.text_offset)
        self.text_offset += len(text)
        return {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": reason}

    def whole(self, deltas: list[Delta]) -> dict:
        text = "".join(d.text for d in deltas)
        entries = [entry for d in deltas for entry in d.logprobs]
        return self._object([self._choice(text, entries, finish_reason(deltas[-1]))], usage=usage(deltas[-1]))

    def opening(self) -> list[dict]:
        return []

    def delta(self, delta: Delta) -> list[dict]:
        if not delta.text and not delta.logprobs and not delta.finish_reason:
            return []
        choice = self._choice(delta.text, delta.logprobs, finish_reason(delta))
        # NOTE: with include_usage, every chunk carries "usage": null, as OpenAI's do
        return [self._object([choice], **({"usage": None} if self.include_usage else {}))]

    def usage(self, last: Delta) -> dict:
        return self._object([], usage=usage(last))

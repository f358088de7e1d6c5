"""POST /v1/chat/completions: messages in (rendered by the Triton model's chat template), a reply out."""

from __future__ import annotations

import json
import time
import uuid

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from openai_api.errors import bad_request
from openai_api.generation import Service, client_gone, collect, event_stream, finish_reason, start, usage
from openai_api.logprobs import chat_logprobs
from openai_api.schema import ChatCompletionRequest
from openai_api.triton import Delta


async def create_chat_completion(body: ChatCompletionRequest, request: Request, service: Service) -> Response:
    service.check_model(body.model)
    body.check()
    if not service.model_info.supports_chat:
        raise bad_request(f"chat is not available: the Triton model {service.backend.model!r} has no "
                          f"`messages` input; use /v1/completions", param="messages", code="chat_not_supported")
    fields = {"messages": body.messages_json(), "stream": True, "exclude_input_in_output": True,
              "sampling_parameters": json.dumps(body.sampling_parameters())}
    chunks = ChatChunks(f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), service,
                        with_logprobs=body.logprobs, include_usage=body.include_usage)
    if body.stream:
        started = await start(request, service.backend, fields, chunks.id)
        return client_gone() if started is None else event_stream(*started, chunks, body.include_usage)
    deltas = await collect(request, service.backend, fields, chunks.id)
    return client_gone() if deltas is None else JSONResponse(chunks.whole(deltas))


class ChatChunks:
    """Chat objects of one request: `chat.completion`, or `chat.completion.chunk`s when streaming."""

    def __init__(self, id_: str, created: int, service: Service, with_logprobs: bool, include_usage: bool) -> None:
        self.id, self.created, self.service = id_, created, service
        self.with_logprobs, self.include_usage = with_logprobs, include_usage

    def _object(self, kind: str, choices: list[dict], **extra) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.service.served_model_name,
                "choices": choices, "system_fingerprint": None, **extra}

    def _logprobs(self, entries: list[dict]) -> dict | None:
        if not self.with_logprobs:
            return None
        return {"content": chat_logprobs(entries, self.service.tokens), "refusal": None}

    def whole(self, deltas: list[Delta]) -> dict:
        message = {"role": "assistant", "content": "".join(d.text for d in deltas), "refusal": None}
        choice = {"index": 0, "message": message, "logprobs": self._logprobs([e for d in deltas for e in d.logprobs]),
                  "finish_reason": finish_reason(deltas[-1])}
        return self._object("chat.completion", [choice], usage=usage(deltas[-1]))

    def _chunk(self, delta: dict, logprobs: dict | None = None, reason: str | None = None) -> dict:
        choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
        # NOTE: with include_usage, every chunk carries "usage": null, as OpenAI's do
        return self._object("chat.completion.chunk", [choice], **({"usage": None} if self.include_usage else {}))

    def opening(self) -> list[dict]:
        return [self._chunk({"role": "assistant", "content": ""})]

    def delta(self, delta: Delta) -> list[dict]:
        chunks = []
        if delta.text or delta.logprobs:
            chunks.append(self._chunk({"content": delta.text}, self._logprobs(delta.logprobs)))
        if delta.finish_reason:
            chunks.append(self._chunk({}, reason=finish_reason(delta)))
        return chunks

    def usage(self, last: Delta) -> dict:
        return self._object("chat.completion.chunk", [], usage=usage(last))

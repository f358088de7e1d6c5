"""ASGI middleware in front of every route: a drain, the API key, then the request body limit."""

from __future__ import annotations

import hmac
import threading

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from openai_api.errors import ApiError, body_too_large, shutting_down, unauthorized

OPEN_PATHS = ("/health",)  # NOTE: no key needed: load balancers and `make serve` probe it


class Gatekeeper:
    """503 once the server drains (every path, /health too); 401 without the right `Authorization:
    Bearer <key>` (when a key is set); 413 past the body limit.

    The body is read here, at most max_body_bytes of it, whatever Content-Length says (a chunked
    body has none), and handed to the app in one piece; later receive() calls go to the client, so
    the app still learns of a disconnect.
    """

    def __init__(self, app: ASGIApp, api_key: str | None, max_body_bytes: int, draining: threading.Event) -> None:
        self.app, self.api_key, self.max_body_bytes, self.draining = app, api_key, max_body_bytes, draining

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.draining.is_set():  # NOTE: requests that came in before go on; their streams finish
            await _answer(shutting_down(), scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.api_key is not None and scope["path"] not in OPEN_PATHS and not self._authorized(headers):
            await _answer(unauthorized(), scope, receive, send)
            return
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body_bytes:
            await _answer(body_too_large(self.max_body_bytes), scope, receive, send)
            return
        body, more, message = b"", True, None
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break  # NOTE: the client left; the app sees the disconnect
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_body_bytes:
                await _answer(body_too_large(self.max_body_bytes), scope, receive, send)
                return
        await self.app(scope, _replay(body, message, receive), send)

    def _authorized(self, headers: dict[str, str]) -> bool:
        scheme, _, key = headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(key.strip().encode(), self.api_key.encode())


def _replay(body: bytes, last: Message | None, receive: Receive) -> Receive:
    """A receive() that first returns the whole body (or the disconnect that cut it), then the client's."""
    first: Message = {"type": "http.request", "body": body, "more_body": False}
    if last is not None and last["type"] != "http.request":
        first = last
    pending = [first]

    async def replay() -> Message:
        return pending.pop() if pending else await receive()

    return replay


async def _answer(error: ApiError, scope: Scope, receive: Receive, send: Send) -> None:
    await error.response()(scope, receive, send)

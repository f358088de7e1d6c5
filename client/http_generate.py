"""Generation over HTTP with Triton's generate extension: `generate` (one JSON) and `generate_stream` (SSE)."""

from __future__ import annotations

import http.client
import json
import time
from typing import Iterator
from urllib.parse import quote

from client.address import split_url
from client.chunk import Chunk
from client.errors import ConnectionFailed, RequestTimeout, ServerError


def http_generate(url: str, model: str, fields: dict, timeout: float | None = None) -> Iterator[Chunk]:
    """POST to generate_stream when fields ask to stream, else to generate; yield the Chunks."""
    stream = bool(fields.get("stream"))
    path = f"/v2/models/{quote(model, safe='')}/generate{'_stream' if stream else ''}"
    deadline = None if timeout is None else time.monotonic() + timeout
    connection = _connection(url, timeout)
    response = None
    try:
        response, sock = _post(connection, path, fields, url, timeout)
        reader = _Reader(response, sock, deadline, timeout, url)
        if response.status != 200:
            raise _status_error(response, reader.read_all())
        if stream:
            yield from _events(reader, url)
        else:
            yield _chunk(_json(reader.read_all()))
    finally:
        if response is not None:
            response.close()
        connection.close()


def _connection(url: str, timeout: float | None) -> http.client.HTTPConnection:
    host, port = split_url(url)
    return http.client.HTTPConnection(host, port, timeout=timeout)


def _post(connection, path: str, fields: dict, url: str, timeout: float | None):
    """Send the request; the response (headers read) and its socket."""
    body = json.dumps(fields).encode("utf-8")
    headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
    try:
        connection.request("POST", path, body=body, headers=headers)
        sock = connection.sock  # NOTE: getresponse() may drop connection.sock; the response keeps using it
        return connection.getresponse(), sock
    except TimeoutError:
        raise RequestTimeout(f"no complete answer within {timeout:g} s") from None
    except OSError as exc:
        raise ConnectionFailed(f"cannot reach {url} over HTTP: {exc}") from None
    except http.client.HTTPException as exc:
        raise ConnectionFailed(f"{url} did not answer in HTTP ({type(exc).__name__})") from None


def _events(reader: "_Reader", url: str) -> Iterator[Chunk]:
    """Server-sent events: each `data: {...}` line is one response or an error; stop after the last."""
    while True:
        line = reader.readline()
        if line is None:
            raise ConnectionFailed(f"{url} closed the stream before the final response")
        if not line.startswith("data:"):
            continue  # blank separators, comments, other SSE fields
        chunk = _chunk(_json(line[len("data:"):]))
        yield chunk
        if chunk.finished:
            return


class _Reader:
    """Reads a response body with the socket timeout set to what is left of the deadline."""

    def __init__(self, response, sock, deadline: float | None, timeout: float | None, url: str) -> None:
        self.response, self.sock, self.deadline, self.timeout, self.url = response, sock, deadline, timeout, url

    def readline(self) -> str | None:
        """The next line, stripped; None at the end of the body."""
        line = self._call(self.response.readline)
        return line.decode("utf-8", "replace").strip() if line else None

    def read_all(self) -> str:
        """The rest of the body."""
        return self._call(self.response.read).decode("utf-8", "replace")

    def _call(self, read) -> bytes:
        if self.deadline is not None:
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                raise self._timeout()
            if self.sock is not None:
                self.sock.settimeout(remaining)
        try:
            return read()
        except TimeoutError:
            raise self._timeout() from None
        except OSError as exc:
            raise ConnectionFailed(f"connection to {self.url} broke: {exc}") from None
        except http.client.HTTPException as exc:
            raise ConnectionFailed(f"bad HTTP from {self.url} ({type(exc).__name__})") from None

    def _timeout(self) -> RequestTimeout:
        return RequestTimeout(f"no complete answer within {self.timeout:g} s")


def _json(text: str) -> dict:
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        raise ServerError(f"the server sent something other than JSON: {text[:200]!r}") from None
    if not isinstance(data, dict):
        raise ServerError(f"the server sent JSON that is not an object: {text[:200]!r}")
    if "error" in data:
        raise ServerError(str(data["error"]))
    return data


def _status_error(response, body: str) -> ServerError:
    """The error of a non-200 answer: its JSON `error`, else the SSE `data:` error, else the body."""
    for text in (body, *(line[len("data:"):] for line in body.splitlines() if line.startswith("data:"))):
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            continue
        if isinstance(data, dict) and "error" in data:
            return ServerError(str(data["error"]), response.status)
    return ServerError(f"HTTP {response.status} {response.reason}: {body.strip()[:200]}", response.status)


def _chunk(data: dict) -> Chunk:
    return Chunk(
        text=_text(data.get("text_output", "")),
        finish_reason=_text(data.get("finish_reason", "")),
        num_input_tokens=_int(data.get("num_input_tokens", 0)),
        num_output_tokens=_int(data.get("num_output_tokens", 0)),
    )


def _text(value) -> str:
    # NOTE: the generate extension unwraps one-element outputs into scalars; longer ones stay lists.
    return "".join(map(str, value)) if isinstance(value, list) else str(value)


def _int(value) -> int:
    if isinstance(value, list):
        return int(value[0]) if value else 0
    return int(value)

"""The client's function API: generate() over either protocol, health() checks."""

from __future__ import annotations

from typing import Iterator

from client.chunk import Chunk
from client.errors import ClientError
from client.health import Check, check_health
from client.request import MODEL_NAME, SamplingOptions, request_fields

PROTOCOLS = ("grpc", "http")
DEFAULT_URLS = {"grpc": "127.0.0.1:8001", "http": "127.0.0.1:8000"}
DEFAULT_TIMEOUT_S = 300.0
HEALTH_TIMEOUT_S = 10.0


def default_url(protocol: str) -> str:
    """Triton's default local address for a protocol."""
    _check_protocol(protocol)
    return DEFAULT_URLS[protocol]


def generate(prompt: str, *, protocol: str = "grpc", url: str | None = None, stream: bool = False,
             model: str = MODEL_NAME, timeout: float | None = DEFAULT_TIMEOUT_S,
             request_id: str | None = None, **sampling) -> Iterator[Chunk]:
    """Chunks of prompt's completion (prompt excluded) as they arrive; nothing is sent until iterated."""
    # NOTE: sampling takes max_tokens, temperature, top_p, top_k, seed, stop (str or list), ignore_eos.
    # Iterating raises ClientError (ServerError, ConnectionFailed, RequestTimeout); closing the iterator
    # before the last chunk cancels the request. request_id is sent over gRPC only.
    _check_protocol(protocol)
    fields = request_fields(prompt, stream, _sampling(sampling))
    url = url or DEFAULT_URLS[protocol]
    if protocol == "grpc":
        from client.grpc_stream import stream_generate

        return stream_generate(url, model, fields, timeout, request_id)
    from client.http_generate import http_generate

    return http_generate(url, model, fields, timeout)


def complete(prompt: str, **options) -> Chunk:
    """The whole completion as one Chunk (text joined, counts and finish reason of the last chunk)."""
    chunks = list(generate(prompt, **options))
    if not chunks:
        raise ClientError("the server sent no response")
    last = chunks[-1]
    text = "".join(c.text for c in chunks)
    return Chunk(text, last.finish_reason, last.num_input_tokens, last.num_output_tokens)


def health(*, protocol: str = "grpc", url: str | None = None, model: str = MODEL_NAME,
           timeout: float | None = HEALTH_TIMEOUT_S) -> list[Check]:
    """Server live, server ready and model ready checks; all ok means the server can take requests."""
    _check_protocol(protocol)
    return check_health(protocol, url or DEFAULT_URLS[protocol], model, timeout)


def _sampling(options: dict) -> SamplingOptions:
    stop = options.pop("stop", None) or ()
    try:
        return SamplingOptions(stop=(stop,) if isinstance(stop, str) else tuple(stop), **options)
    except TypeError as exc:
        raise TypeError(f"unknown sampling option: {exc}") from None


def _check_protocol(protocol: str) -> None:
    if protocol not in PROTOCOLS:
        raise ClientError(f"unknown protocol {protocol!r}; use one of {', '.join(PROTOCOLS)}")

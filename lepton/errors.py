"""Errors the engine raises towards clients; the serving layer maps them to Triton error codes."""

from __future__ import annotations

import enum


class LeptonError(Exception):
    """Base class of every error Lepton reports to a client."""


class InvalidRequest(LeptonError, ValueError):
    """A request field is missing, malformed or out of its limits (INVALID_ARG / HTTP 400)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


SHUTTING_DOWN_PREFIX = "server shutting down"


class ServerBusy(LeptonError):
    """The waiting queue is full; the client should retry later (UNAVAILABLE / HTTP 503)."""


class ServerShuttingDown(ServerBusy):
    """The server is draining before it stops; the client should go to another server (UNAVAILABLE / HTTP 503)."""

    def __init__(self) -> None:
        super().__init__(f"{SHUTTING_DOWN_PREFIX}: not accepting new requests; retry on another server")


class ModelFolderError(LeptonError, ValueError):
    """A model folder cannot be served: unsupported architecture, missing weights or tokenizer."""


class ConfigError(LeptonError, ValueError):
    """An engine configuration key is unknown or its value is invalid."""


class ErrorKind(enum.Enum):
    """How a front end should answer an error (Triton: INVALID_ARG, UNAVAILABLE, INTERNAL)."""

    INVALID = "invalid"
    BUSY = "busy"
    INTERNAL = "internal"


_INTERNAL_PREFIX = "internal error: "
_BUSY_PREFIX = "server busy"


def describe(exc: Exception) -> tuple[ErrorKind, str]:
    """The kind and the client-facing message of an exception."""
    if isinstance(exc, InvalidRequest):
        return ErrorKind.INVALID, str(exc)
    if isinstance(exc, ServerShuttingDown):
        return ErrorKind.BUSY, str(exc)
    if isinstance(exc, ServerBusy):
        return ErrorKind.BUSY, str(exc) if str(exc).startswith(_BUSY_PREFIX) else f"{_BUSY_PREFIX}: {exc}"
    return ErrorKind.INTERNAL, f"{_INTERNAL_PREFIX}{exc}"


def kind_of_message(message: str) -> ErrorKind:
    """Recover the kind from a message made by `describe` (Triton's BLS drops error codes)."""
    if message.startswith(_INTERNAL_PREFIX):
        return ErrorKind.INTERNAL
    if message.startswith((_BUSY_PREFIX, SHUTTING_DOWN_PREFIX)):
        return ErrorKind.BUSY
    return ErrorKind.INVALID

"""Errors the client raises; the CLI prints them as `error: <message>` and exits 1."""

from __future__ import annotations


class ClientError(Exception):
    """Base class of every error a Lepton client call reports."""


class ServerError(ClientError):
    """The server answered with an error (an invalid request, an unknown model, a busy queue)."""

    def __init__(self, message: str, status: int | str | None = None) -> None:
        super().__init__(message)
        self.status = status  # HTTP status code or gRPC status name, when known


class ConnectionFailed(ClientError):
    """The server could not be reached or the connection broke."""


class RequestTimeout(ClientError):
    """The request did not finish within its timeout; it was cancelled."""

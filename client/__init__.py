"""Lepton's client: generate text and check health over Triton's gRPC or HTTP endpoints."""

from client.api import DEFAULT_URLS, complete, default_url, generate, health
from client.chunk import Chunk
from client.errors import ClientError, ConnectionFailed, RequestTimeout, ServerError
from client.health import Check
from client.stats import GenerationStats

__all__ = [
    "Check", "Chunk", "ClientError", "ConnectionFailed", "DEFAULT_URLS", "GenerationStats",
    "RequestTimeout", "ServerError", "complete", "default_url", "generate", "health",
]

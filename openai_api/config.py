"""The API service's settings: one typed object, filled from CLI flags (or by a caller)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# NOTE: Triton refuses prompts over 1 MiB; the margin leaves room for JSON escaping and the other fields.
DEFAULT_MAX_BODY_BYTES = (1 << 20) + (256 << 10)
API_KEY_ENV = "LEPTON_API_KEY"


@dataclass(frozen=True)
class ApiConfig:
    """Where to listen, which Triton model to call, and the limits of a request."""

    host: str = "127.0.0.1"  # loopback unless asked otherwise
    port: int = 9000
    triton_url: str = "127.0.0.1:8001"  # Triton's gRPC address
    triton_model: str = "lepton"  # the decoupled (streaming) Triton model
    served_model_name: str | None = None  # the name clients pass as `model`; default: the model folder's name
    model_dir: Path | None = None  # tokenizer for logprob token strings; default: Triton's model_dir, if local
    api_key: str | None = None  # when set, every /v1 request needs `Authorization: Bearer <key>`
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    triton_timeout_s: float = 30.0  # how long to wait at start for Triton's model to be ready
    log_level: str = "info"

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be in 1..65535, got {self.port}")
        if self.max_body_bytes < 1024:
            raise ValueError(f"max_body_bytes must be >= 1024, got {self.max_body_bytes}")
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("api_key is empty")

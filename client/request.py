"""Sampling options and the request fields (model input name -> value) both protocols send."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from client.errors import ClientError

MODEL_NAME = "lepton"


@dataclass(frozen=True)
class SamplingOptions:
    """Per-request sampling and stopping; None (or no stop strings) leaves the server's default."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    ignore_eos: bool | None = None

    def __post_init__(self) -> None:
        # NOTE: a negative seed would wrap around in gRPC's UINT64 tensor; catch it here for both protocols.
        if self.seed is not None and self.seed < 0:
            raise ClientError(f"seed: must be >= 0, got {self.seed}")


def request_fields(prompt: str, stream: bool, sampling: SamplingOptions) -> dict:
    """The model inputs of one request: prompt, stream flag and the sampling options that are set."""
    fields = {"text_input": prompt, "stream": stream, "exclude_input_in_output": True}
    for option in dataclasses.fields(sampling):
        value = getattr(sampling, option.name)
        if value is not None and value != ():
            fields[option.name] = list(value) if option.name == "stop" else value
    return fields

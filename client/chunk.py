"""One piece of a generation as the server sent it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Chunk:
    """A response: new text (a delta when streaming, the whole completion otherwise) and counts so far."""

    text: str
    finish_reason: str = ""  # '' until the last chunk, then 'stop', 'length' or 'cancelled'
    num_input_tokens: int = 0
    num_output_tokens: int = 0  # generated so far, cumulative

    @property
    def finished(self) -> bool:
        """Whether this is the last chunk of the request."""
        return bool(self.finish_reason)

"""Timing of one generation: time to first token, output tokens per second."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from client.chunk import Chunk


@dataclass
class GenerationStats:
    """Feed every Chunk to observe(); the clock starts at creation: after generate(), before iterating."""

    started: float = field(default_factory=time.monotonic)
    first_text_at: float | None = None
    ended_at: float | None = None
    finish_reason: str = ""
    num_input_tokens: int = 0
    num_output_tokens: int = 0

    def observe(self, chunk: Chunk) -> None:
        """Record a chunk's arrival and the server's counts."""
        now = time.monotonic()
        if self.first_text_at is None and chunk.text:
            self.first_text_at = now
        self.ended_at = now
        self.finish_reason = chunk.finish_reason or self.finish_reason
        self.num_input_tokens = chunk.num_input_tokens
        self.num_output_tokens = chunk.num_output_tokens

    @property
    def time_to_first_token(self) -> float | None:
        """Seconds from the request to the first text (the whole text when not streaming)."""
        return None if self.first_text_at is None else self.first_text_at - self.started

    @property
    def total_seconds(self) -> float:
        """Seconds from the request to the last chunk (or to now, if none came)."""
        return (self.ended_at or time.monotonic()) - self.started

    @property
    def tokens_per_second(self) -> float:
        """Output tokens over the whole request time, time to first token included."""
        total = self.total_seconds
        return self.num_output_tokens / total if total > 0 else 0.0

    def summary(self) -> str:
        """One line: finish reason, token counts, ttft, total time and tokens/s."""
        ttft = self.time_to_first_token
        return (
            f"finish_reason={self.finish_reason or '-'} input_tokens={self.num_input_tokens} "
            f"output_tokens={self.num_output_tokens} "
            f"ttft_ms={'-' if ttft is None else f'{ttft * 1000:.1f}'} "
            f"total_s={self.total_seconds:.3f} tokens_per_s={self.tokens_per_second:.1f}"
        )

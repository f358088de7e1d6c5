"""One request's token state as the scheduler sees it (no torch)."""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field

from lepton.sampling_params import SamplingParams

_arrival_counter = itertools.count()


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"  # eos token, stop token id or stop string
    LENGTH = "length"  # max_tokens or the model's context reached
    CANCELLED = "cancelled"  # the client cancelled or went away
    ERROR = "error"  # the request failed (RequestOutput.error says why)

    def __str__(self) -> str:
        return self.value


@dataclass(eq=False)
class Sequence:
    """Prompt and generated tokens of one request, and how many of them are in the KV cache."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    max_total_tokens: int  # prompt + generated tokens may not exceed this (the model's context)
    arrival_order: int = field(default_factory=lambda: next(_arrival_counter))
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    num_cached_tokens: int = 0  # of the prompt, tokens found in the prefix cache at admission
    num_preemptions: int = 0
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def sort_key(self) -> tuple[int, int]:
        """Scheduling order: lower priority value first, then arrival."""
        return (self.params.priority, self.arrival_order)

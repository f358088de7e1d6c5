"""Per-request sampling and stopping parameters, validated once at the door."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from lepton.config import LOGPROBS_CEILING, STOP_STRING_CHARS_CEILING, STOP_STRINGS_CEILING
from lepton.errors import InvalidRequest

# NOTE: bounds that hold whatever the server's configuration; the configured limits (LimitsConfig:
# stop strings, their length, logprobs, max_tokens) and the context are checked at the door and by the engine.
MAX_TOP_K = 1 << 20
MAX_STOP_STRINGS = STOP_STRINGS_CEILING
MAX_STOP_STRING_CHARS = STOP_STRING_CHARS_CEILING
MAX_LOGPROBS = LOGPROBS_CEILING
MAX_SEED = (1 << 63) - 1
MAX_STOP_TOKEN_IDS = 64
# NOTE: a penalty below this underflows or overflows float32 logits (1e-300 becomes 0 and divides by
# zero); vLLM's useful range is about 1..2, so [0.01, 100] loses nothing.
MIN_REPETITION_PENALTY = 0.01
MAX_REPETITION_PENALTY = 100.0
BOOL_FIELDS = ("include_stop_str_in_output", "ignore_eos", "skip_special_tokens")


@dataclass(frozen=True)
class SamplingParams:
    """What to sample and when to stop, for one request (vLLM's field names)."""

    max_tokens: int = 16  # new tokens to generate at most
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0  # nucleus mass kept, in (0, 1]
    top_k: int = 0  # 0 means no top-k cut
    min_p: float = 0.0  # drop tokens below min_p * max prob
    repetition_penalty: float = 1.0  # > 1 discourages tokens seen in prompt or output
    presence_penalty: float = 0.0  # subtracted once from logits of tokens already generated
    frequency_penalty: float = 0.0  # subtracted per occurrence in the generated tokens
    seed: int | None = None  # makes sampling reproducible whatever else is batched
    stop: tuple[str, ...] = ()  # stop strings, cut from the output
    stop_token_ids: tuple[int, ...] = ()  # extra token ids that end generation
    include_stop_str_in_output: bool = False
    min_tokens: int = 0  # eos and stops are ignored until this many tokens exist
    ignore_eos: bool = False  # keep generating past eos (until max_tokens or a stop)
    logprobs: int | None = None  # top-n logprobs to return per generated token
    skip_special_tokens: bool = True
    priority: int = 0  # lower value is scheduled first; ties are first-come first-served

    def __post_init__(self) -> None:
        _check_int("max_tokens", self.max_tokens, low=1)
        _check_float("temperature", self.temperature, low=0.0, high=100.0)
        _check_float("top_p", self.top_p, low=0.0, high=1.0, low_open=True)
        _check_int("top_k", self.top_k, low=0, high=MAX_TOP_K)
        _check_float("min_p", self.min_p, low=0.0, high=1.0)
        _check_float("repetition_penalty", self.repetition_penalty,
                     low=MIN_REPETITION_PENALTY, high=MAX_REPETITION_PENALTY)
        _check_float("presence_penalty", self.presence_penalty, low=-2.0, high=2.0)
        _check_float("frequency_penalty", self.frequency_penalty, low=-2.0, high=2.0)
        if self.seed is not None:
            _check_int("seed", self.seed, low=0, high=MAX_SEED)
        _check_int("min_tokens", self.min_tokens, low=0)
        if self.min_tokens > self.max_tokens:
            raise InvalidRequest(
                "min_tokens", f"must be <= max_tokens ({self.max_tokens}), got {self.min_tokens}"
            )
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, low=0, high=MAX_LOGPROBS)
        _check_int("priority", self.priority, low=-(1 << 31), high=(1 << 31) - 1)
        if len(self.stop) > MAX_STOP_STRINGS:
            raise InvalidRequest("stop", f"at most {MAX_STOP_STRINGS} stop strings, got {len(self.stop)}")
        for s in self.stop:
            if not isinstance(s, str) or not s or not is_unicode(s):
                raise InvalidRequest("stop", f"each stop string must be non-empty text, got {show_value(s)}")
            if len(s) > MAX_STOP_STRING_CHARS:  # NOTE: the server's own limit (LimitsConfig) is usually lower
                raise InvalidRequest("stop", f"each stop string must be 1..{MAX_STOP_STRING_CHARS} characters, "
                                             f"got one of {len(s)}")
        if not isinstance(self.stop, tuple) or not isinstance(self.stop_token_ids, tuple):
            raise InvalidRequest("stop" if not isinstance(self.stop, tuple) else "stop_token_ids", "must be a list")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise InvalidRequest(
                "stop_token_ids", f"at most {MAX_STOP_TOKEN_IDS} ids, got {len(self.stop_token_ids)}"
            )
        for t in self.stop_token_ids:
            _check_int("stop_token_ids", t, low=0, high=MAX_SEED)
        for name in BOOL_FIELDS:
            if not isinstance(getattr(self, name), bool):
                raise InvalidRequest(name, f"must be true or false, got {show_value(getattr(self, name))}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def uses_penalties(self) -> bool:
        """Whether any penalty changes the logits (lepton/sampler.py applies them)."""
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0

    def argmax_only(self, num_output_tokens: int) -> bool:
        """Whether the sampler reads nothing of this request's next logits but their argmax (lepton/sampler.py):
        greedy, no logprobs, no penalty, and min_tokens reached (before it, eos and stops are masked first)."""
        return (self.greedy and self.logprobs is None and not self.uses_penalties
                and num_output_tokens >= self.min_tokens)

    def replace(self, **changes) -> "SamplingParams":
        return dataclasses.replace(self, **changes)


FIELD_NAMES = frozenset(f.name for f in dataclasses.fields(SamplingParams))


def show_value(value, limit: int = 40) -> str:
    """repr(value) cut to limit characters, so an error never echoes a huge input back."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 10**limit:
        return f"an integer of {len(str(abs(value)))} digits"
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def show_keys(keys: list[str], limit: int = 3) -> str:
    """The first `limit` keys, each as show_value writes it, and how many more there are."""
    shown = ", ".join(show_value(key) for key in keys[:limit])
    return shown if len(keys) <= limit else f"{shown} and {len(keys) - limit} more"


def is_unicode(text: str) -> bool:
    """False for a str holding a lone surrogate (JSON's "\\ud800"): not text, and not UTF-8 encodable."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_int(name: str, value, low: int | None = None, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(name, f"must be an integer, got {show_value(value)}")
    if low is not None and value < low:
        raise InvalidRequest(name, f"must be >= {low}, got {show_value(value)}")
    if high is not None and value > high:
        raise InvalidRequest(name, f"must be <= {high}, got {show_value(value)}")


def _check_float(name: str, value, low: float, high: float, low_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise InvalidRequest(name, f"must be a number, got {show_value(value)}")
    if isinstance(value, int) and abs(value) > 10**40:
        raise InvalidRequest(name, f"must be in [{low}, {high}], got {show_value(value)}")
    if value < low or (low_open and value == low):
        bound = f"> {low}" if low_open else f">= {low}"
        raise InvalidRequest(name, f"must be {bound}, got {show_value(value)}")
    if value > high:
        raise InvalidRequest(name, f"must be <= {high}, got {show_value(value)}")

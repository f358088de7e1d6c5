"""Streaming detokenization: generated token ids in, UTF-8 safe text deltas out, with stop strings."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import tokenizers

# NOTE: how many prompt tokens seed the decode window (vLLM's INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET),
# so decoders that strip the first token's leading space (Metaspace) never see a generated token first.
PROMPT_CONTEXT_TOKENS = 5
# NOTE: ids before the window are dropped once this many piled up (memory per request stays bounded).
_TRIM_AT = 256
REPLACEMENT_CHAR = "\ufffd"


@dataclass
class _DecodeWindow:
    """vLLM's window: new text = decode(ids[prefix_offset:]) minus decode(ids[prefix_offset:read_offset])."""

    ids: list[int]
    prefix_offset: int
    read_offset: int
    prefix_text: str | None = None  # decode(ids[prefix_offset:read_offset]), computed lazily


@dataclass(frozen=True)
class _StopMatch:
    """Where the earliest-ending stop string sits in the search buffer."""

    start: int
    end: int
    stop: str


class IncrementalDetokenizer:
    """Turns generated token ids into text deltas, UTF-8 safe, with stop strings."""

    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        prompt_token_ids: Sequence[int],
        *,
        skip_special_tokens: bool = True,
        stop: Sequence[str] = (),
        include_stop_str_in_output: bool = False,
        min_tokens: int = 0,
    ) -> None:
        if isinstance(stop, str):
            raise TypeError("stop must be a sequence of strings, not a string")
        if any(not isinstance(s, str) or not s for s in stop):
            raise ValueError(f"stop strings must be non-empty strings, got {list(stop)!r}")
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._stops: tuple[str, ...] = tuple(dict.fromkeys(stop))
        self._include_stop = include_stop_str_in_output
        # NOTE: as in vLLM, no stop string ends the output before min_tokens tokens exist; a stop
        # string that ends in the text of a later token still counts, wherever it began.
        self._min_tokens = min_tokens
        self._num_tokens = 0
        # NOTE: a stop string can span at most this many already-seen characters, so that many are held back.
        self._hold = max((len(s) for s in self._stops), default=1) - 1
        context = [int(t) for t in prompt_token_ids[max(len(prompt_token_ids) - PROMPT_CONTEXT_TOKENS, 0) :]]
        self._window = _DecodeWindow(ids=context, prefix_offset=0, read_offset=len(context))
        self._pending = ""  # decoded generated text not yet returned (held back for stop strings)
        self._sent: list[str] = []  # every delta returned so far
        self._finished = False  # flush() was called
        self.stopped_by: str | None = None

    @property
    def output_text(self) -> str:
        """All text returned so far (the sum of the deltas)."""
        if len(self._sent) > 1:
            self._sent = ["".join(self._sent)]
        return self._sent[0] if self._sent else ""

    @property
    def finished(self) -> bool:
        """Whether no more text can come: a stop string matched or flush() was called."""
        return self._finished or self.stopped_by is not None

    def add_tokens(self, token_ids: Sequence[int]) -> str:
        """Feeds newly generated token ids; returns the text that is safe to send now (maybe "")."""
        if self._finished:
            raise RuntimeError("add_tokens() called after flush()")
        if self.stopped_by is not None:
            return ""
        self._window.ids.extend(int(t) for t in token_ids)
        self._num_tokens += len(token_ids)
        return self._release(self._decode_new(final=False), final=False)

    def flush(self) -> str:
        """Ends the stream (eos, length, cancel); returns all text still held back."""
        if self._finished or self.stopped_by is not None:
            self._finished = True
            return ""
        self._finished = True
        # NOTE: an incomplete UTF-8 sequence at the very end is emitted as U+FFFD, exactly as
        # tokenizer.decode() renders it, so streamed deltas + flush() == decode(all generated ids).
        return self._release(self._decode_new(final=True), final=True)

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)

    def _decode_new(self, *, final: bool) -> str:
        """Decodes only the window; returns the text of tokens past read_offset once it is complete."""
        w = self._window
        if w.read_offset == len(w.ids):
            return ""
        if w.prefix_text is None:
            w.prefix_text = self._decode(w.ids[w.prefix_offset : w.read_offset])
        new_text = self._decode(w.ids[w.prefix_offset :])
        # NOTE: a trailing U+FFFD means a multi-byte character is still incomplete (byte-level BPE splits
        # CJK and emoji over several tokens): hold those tokens back until a later token completes it.
        # Because read_offset only advances past complete characters, prefix_text is a prefix of new_text.
        if len(new_text) <= len(w.prefix_text) or (new_text.endswith(REPLACEMENT_CHAR) and not final):
            return ""
        delta = new_text[len(w.prefix_text) :]
        w.prefix_offset, w.read_offset, w.prefix_text = w.read_offset, len(w.ids), None
        if w.prefix_offset >= _TRIM_AT:
            del w.ids[: w.prefix_offset]
            w.read_offset -= w.prefix_offset
            w.prefix_offset = 0
        return delta

    def _release(self, new_text: str, *, final: bool) -> str:
        """Checks stop strings over held-back + new text; returns what can be sent and keeps the rest."""
        if not new_text and not (final and self._pending):
            return ""
        buf = self._pending + new_text
        stops = self._stops if self._num_tokens >= self._min_tokens else ()
        match = _find_stop(buf, len(self._pending), stops)
        if match is not None:
            self.stopped_by = match.stop
            out = buf[: match.end if self._include_stop else match.start]
            self._pending = ""
        elif final or self._hold == 0:
            out, self._pending = buf, ""
        else:
            # NOTE: the last `hold` characters could be the start of a stop string: keep them back.
            cut = max(len(buf) - self._hold, 0)
            out, self._pending = buf[:cut], buf[cut:]
        if out:
            self._sent.append(out)
        return out


def _find_stop(buf: str, new_from: int, stops: Sequence[str]) -> _StopMatch | None:
    """Earliest-ending stop string in buf that ends past new_from; ties go to the longest one."""
    best: _StopMatch | None = None
    for stop in stops:
        # NOTE: occurrences ending at or before new_from were already searched for in an earlier call.
        idx = buf.find(stop, max(new_from - len(stop) + 1, 0))
        if idx < 0:
            continue
        cand = _StopMatch(start=idx, end=idx + len(stop), stop=stop)
        if best is None or (cand.end, cand.start) < (best.end, best.start):
            best = cand
    return best

"""Lepton's logprobs entries (token ids) in OpenAI's two shapes, with token strings from the tokenizer."""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path

logger = logging.getLogger("openai_api")


@functools.lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: the character a byte-level BPE token uses -> the byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


class TokenTexts:
    """Token id -> (text, UTF-8 bytes). Without a tokenizer: "token_id:<id>", as vLLM's option writes it."""

    def __init__(self, tokenizer=None) -> None:
        self.tokenizer = tokenizer
        self.byte_level = tokenizer is not None and _is_byte_level(tokenizer)
        self._cache: dict[int, tuple[str, list[int]]] = {}

    @classmethod
    def from_model_dir(cls, model_dir: Path | None) -> "TokenTexts":
        """Load model_dir/tokenizer.json when there is one; else token ids stand in for token strings."""
        path = None if model_dir is None else Path(model_dir) / "tokenizer.json"
        if path is None or not path.is_file():
            logger.info("no tokenizer.json found; logprobs name tokens as token_id:<id>")
            return cls()
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_file(str(path)))

    def get(self, token_id: int) -> tuple[str, list[int]]:
        if token_id not in self._cache:
            self._cache[token_id] = self._lookup(token_id)
        return self._cache[token_id]

    def _lookup(self, token_id: int) -> tuple[str, list[int]]:
        if self.tokenizer is None:
            text = f"token_id:{token_id}"
            return text, list(text.encode())
        piece = self.tokenizer.id_to_token(token_id)
        decoder = _byte_decoder()
        if self.byte_level and piece is not None and all(c in decoder for c in piece):
            # NOTE: exact bytes, also for a token that holds part of a multi-byte character
            raw = bytes(decoder[c] for c in piece)
            return raw.decode("utf-8", "replace"), list(raw)
        text = self.tokenizer.decode([token_id], skip_special_tokens=False)
        return text, list(text.encode())


def _is_byte_level(tokenizer) -> bool:
    decoder = json.loads(tokenizer.to_str()).get("decoder") or {}
    kinds = [decoder.get("type")] + [d.get("type") for d in decoder.get("decoders", [])]
    return "ByteLevel" in kinds


def chat_logprobs(entries: list[dict], tokens: TokenTexts) -> list[dict]:
    """Chat's `logprobs.content`: per token {token, logprob, bytes, top_logprobs}."""
    def item(token_id: int, logprob: float) -> dict:
        text, raw = tokens.get(token_id)
        return {"token": text, "logprob": logprob, "bytes": raw}

    return [{**item(e["token_id"], e["logprob"]), "top_logprobs": [item(t, lp) for t, lp in e["top_logprobs"]]}
            for e in entries]


def completion_logprobs(entries: list[dict], tokens: TokenTexts, text_offset: int) -> dict:
    """Completions' `logprobs`: parallel lists; text_offset of the first token in the completion text."""
    texts = [tokens.get(e["token_id"])[0] for e in entries]
    offsets = []
    for text in texts:
        offsets.append(text_offset)
        text_offset += len(text)
    return {
        "tokens": texts,
        "token_logprobs": [e["logprob"] for e in entries],
        "top_logprobs": [{tokens.get(t)[0]: lp for t, lp in e["top_logprobs"]} for e in entries],
        "text_offset": offsets,
    }

"""Benchmark requests: prompts of an exact token count, output lengths and arrival times."""

from __future__ import annotations

import random
from dataclasses import dataclass

import tokenizers


@dataclass(frozen=True)
class RequestSpec:
    """One request to send: what to ask, how many tokens to get back, and when to send it."""

    request_id: str
    prompt: str
    num_prompt_tokens: int  # as the server's tokenizer counts them (BOS included)
    max_tokens: int
    arrival_s: float = 0.0  # offset from the run's start (open-loop runs only)


class PromptFactory:
    """Builds prompt text whose encoding has exactly the wanted number of tokens."""

    def __init__(self, tokenizer: tokenizers.Tokenizer, seed: int) -> None:
        self.tokenizer = tokenizer
        self.rng = random.Random(seed)
        vocab = tokenizer.get_vocab()
        # NOTE: whole words (byte-level BPE marks a leading space with "Ġ") of plain letters.
        self.words = sorted(
            tokenizer.decode([i]) for tok, i in vocab.items()
            if tok.startswith("Ġ") and tok[1:].isalpha() and tok[1:].isascii() and len(tok) > 2
        )
        self.fillers = [" a", " I", " x", " of", " the", " to", " is", ".", ","]

    def count(self, text: str) -> int:
        return len(self.tokenizer.encode(text).ids)

    def make(self, num_tokens: int, prefix: str = "") -> str:
        """prefix followed by random words; the whole text encodes to exactly num_tokens tokens."""
        text = prefix
        # NOTE: each word is one token and starts a new pre-token, so a batch of words adds one
        # token per word; two tokens of slack are left for the exact fit below.
        while (gap := num_tokens - self.count(text)) > 2:
            text += "".join(self.rng.choice(self.words) for _ in range(gap - 2))
        for _ in range(4 * num_tokens):
            have = self.count(text)
            if have == num_tokens:
                return text
            if have > num_tokens:
                text = text[: text.rstrip().rfind(" ")] if " " in text[len(prefix):] else prefix
                continue
            candidate = text + self.rng.choice(self.fillers)
            if self.count(candidate) <= num_tokens:
                text = candidate
        raise RuntimeError(f"could not build a prompt of exactly {num_tokens} tokens")


def fixed_requests(factory: PromptFactory, tag: str, num: int, prompt_tokens: int, max_tokens: int) -> list[RequestSpec]:
    """num requests with distinct prompts of prompt_tokens tokens (no shared first block)."""
    return [
        RequestSpec(f"{tag}-{i}", p, factory.count(p), max_tokens)
        for i, p in ((i, factory.make(prompt_tokens)) for i in range(num))
    ]


def poisson_requests(
    factory: PromptFactory, num: int, rate_per_s: float, prompt_range: tuple[int, int],
    output_range: tuple[int, int], seed: int,
) -> list[RequestSpec]:
    """Open-loop arrivals: exponential gaps at rate_per_s; uniform prompt and output lengths."""
    rng = random.Random(seed)
    specs, t = [], 0.0
    for i in range(num):
        prompt = factory.make(rng.randint(*prompt_range))
        specs.append(RequestSpec(f"poisson-{i}", prompt, factory.count(prompt), rng.randint(*output_range), t))
        t += rng.expovariate(rate_per_s)
    return specs


def shared_prefix_requests(
    factory: PromptFactory, num: int, prefix_tokens: int, suffix_tokens: int, max_tokens: int, tag: str = "prefix",
) -> list[RequestSpec]:
    """num requests behind one system prompt of prefix_tokens tokens, each with its own suffix."""
    system = factory.make(prefix_tokens)
    specs = []
    for i in range(num):
        prompt = factory.make(prefix_tokens + suffix_tokens, prefix=system + f"\nUser {i}:")
        specs.append(RequestSpec(f"{tag}-{i}", prompt, factory.count(prompt), max_tokens))
    return specs

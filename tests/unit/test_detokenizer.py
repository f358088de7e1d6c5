"""Tests for lepton.detokenizer against real trained tokenizers (byte-level BPE and Metaspace)."""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from lepton.detokenizer import IncrementalDetokenizer

CORPUS = """The quick brown fox jumps over the lazy dog.
Hello world! Streaming detokenization must keep every space right.
Lepton serves large language models with a small inference engine.
Tokens arrive one at a time, and text must never break a character.
Stop strings end a generation early: END, STOP, or a blank line.
The weather is fine today, and the engine is fast.
你好 🙂
"""
CJK = "你好世界，今天天气很好"
EMOJI = "🙂👍"
SAMPLES = [
    "Hello world",
    " The quick brown fox\njumps over the lazy dog.\n\nNew paragraph,  two  spaces.",
    CJK,
    EMOJI,
    f"Mixed: {CJK} and {EMOJI} then English again.",
    "   leading spaces and trailing ones   ",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([CORPUS] * 20, trainer=trainer)
    return tokenizer


@pytest.fixture(scope="module")
def metaspace_tok() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<s>", "</s>"], show_progress=False)
    tokenizer.train_from_iterator([CORPUS] * 20, trainer=trainer)
    return tokenizer


def stream(detok: IncrementalDetokenizer, ids: Sequence[int], chunk: int = 1) -> list[str]:
    """Feeds ids `chunk` at a time; returns every delta, flush() last."""
    deltas = [detok.add_tokens(ids[i : i + chunk]) for i in range(0, len(ids), chunk)]
    return deltas + [detok.flush()]


def stop_reference(text: str, stops: Sequence[str], include: bool) -> tuple[str, str | None]:
    """Naive whole-text answer: cut at the earliest-ending stop string (ties: the longest)."""
    best = None
    for s in stops:
        i = text.find(s)
        if i >= 0 and (best is None or (i + len(s), i) < (best[0] + len(best[1]), best[0])):
            best = (i, s)
    if best is None:
        return text, None
    i, s = best
    return text[: i + len(s) if include else i], s


def test_byte_level_tokenizer_splits_cjk_and_emoji_into_byte_tokens(tok: Tokenizer) -> None:
    for text in (CJK, EMOJI):
        ids = tok.encode(text).ids
        assert len(ids) > len(text)
        assert any("\ufffd" in tok.decode([i]) for i in ids)


@pytest.mark.parametrize("text", SAMPLES)
@pytest.mark.parametrize("chunk", [1, 2, 3, 7])
def test_streaming_equals_decode_all(tok: Tokenizer, text: str, chunk: int) -> None:
    ids = tok.encode(text).ids
    detok = IncrementalDetokenizer(tok, tok.encode("Prompt: ").ids)
    deltas = stream(detok, ids, chunk)
    assert "".join(deltas) == tok.decode(ids) == text
    assert detok.output_text == text
    assert detok.stopped_by is None


@pytest.mark.parametrize("text", SAMPLES)
def test_no_delta_contains_replacement_char(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text).ids
    deltas = stream(IncrementalDetokenizer(tok, []), ids)
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == text


def test_cjk_is_held_until_the_character_completes(tok: Tokenizer) -> None:
    ids = tok.encode("世").ids
    assert len(ids) == 3
    detok = IncrementalDetokenizer(tok, [])
    assert [detok.add_tokens([i]) for i in ids] == ["", "", "世"]


@pytest.mark.parametrize("seed", range(40))
@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_random_token_ids_match_decode(tok: Tokenizer, seed: int, skip_special_tokens: bool) -> None:
    rng = random.Random(seed)
    vocab = tok.get_vocab_size()
    prompt = tok.encode(rng.choice(SAMPLES)).ids
    ids = [rng.randrange(vocab) for _ in range(rng.randrange(1, 80))]
    detok = IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip_special_tokens)
    deltas = stream(detok, ids, chunk=rng.choice([1, 1, 2, 5]))
    # NOTE: random byte tokens can form invalid UTF-8; those bytes come out as U+FFFD, as decode() shows them.
    assert "".join(deltas) == tok.decode(ids, skip_special_tokens=skip_special_tokens)


def test_first_generated_token_keeps_its_leading_space(tok: Tokenizer) -> None:
    prompt = tok.encode("Hello").ids
    gen = tok.encode(" world").ids
    detok = IncrementalDetokenizer(tok, prompt)
    first = detok.add_tokens(gen[:1])
    assert first.startswith(" ")
    assert first + "".join(stream(detok, gen[1:])) == " world"


def test_leading_space_kept_when_decoder_strips_it(metaspace_tok: Tokenizer) -> None:
    prompt = metaspace_tok.encode("Hello").ids
    gen = metaspace_tok.encode(" world").ids
    assert metaspace_tok.decode(gen) == "world"  # decoding alone would lose the space
    assert "".join(stream(IncrementalDetokenizer(metaspace_tok, prompt), gen)) == " world"


def test_stop_string_inside_one_token(tok: Tokenizer) -> None:
    ids = tok.encode("Hello world and more").ids
    assert "orl" in tok.decode([ids[1]])
    detok = IncrementalDetokenizer(tok, [], stop=["orl"])
    deltas = stream(detok, ids)
    assert "".join(deltas) == "Hello w"
    assert detok.stopped_by == "orl"


def test_stop_string_spanning_two_tokens(tok: Tokenizer) -> None:
    ids = tok.encode("Hello world and more").ids
    assert tok.decode(ids[:1]) == "Hello"
    detok = IncrementalDetokenizer(tok, [], stop=["lo wo"])
    deltas = stream(detok, ids)
    assert "".join(deltas) == "Hel"
    assert detok.stopped_by == "lo wo"


def test_stop_string_spanning_prompt_and_output_is_not_matched(tok: Tokenizer) -> None:
    prompt = tok.encode("Say ST").ids
    gen = tok.encode("OP now").ids
    detok = IncrementalDetokenizer(tok, prompt, stop=["STOP"])
    assert "".join(stream(detok, gen)) == "OP now"
    assert detok.stopped_by is None


@pytest.mark.parametrize("chunk", [1, 100])
def test_earliest_stop_string_wins(tok: Tokenizer, chunk: int) -> None:
    ids = tok.encode("The quick brown fox jumps").ids
    detok = IncrementalDetokenizer(tok, [], stop=["fox", "quick"])
    assert "".join(stream(detok, ids, chunk)) == "The "
    assert detok.stopped_by == "quick"


def test_overlapping_stops_ending_together_prefer_longest(tok: Tokenizer) -> None:
    ids = tok.encode("The quick brown fox").ids
    detok = IncrementalDetokenizer(tok, [], stop=["own", "brown"], include_stop_str_in_output=False)
    assert "".join(stream(detok, ids, chunk=100)) == "The quick "
    assert detok.stopped_by == "brown"


def test_include_stop_str_in_output(tok: Tokenizer) -> None:
    ids = tok.encode("Hello world, STOP here please").ids
    detok = IncrementalDetokenizer(tok, [], stop=["STOP"], include_stop_str_in_output=True)
    assert "".join(stream(detok, ids)) == "Hello world, STOP"
    assert detok.output_text == "Hello world, STOP"


def test_nothing_returned_after_stop(tok: Tokenizer) -> None:
    ids = tok.encode("one END two three four").ids
    detok = IncrementalDetokenizer(tok, [], stop=["END"])
    deltas = [(detok.add_tokens([i]), detok.stopped_by) for i in ids]
    first_stopped = next(n for n, (_, by) in enumerate(deltas) if by is not None)
    after_stop = [d for d, _ in deltas[first_stopped + 1 :]]
    assert detok.stopped_by == "END"
    assert after_stop and all(d == "" for d in after_stop)
    assert detok.add_tokens(tok.encode(" more text").ids) == ""
    assert detok.flush() == ""
    assert detok.output_text == "one "


def test_flush_releases_held_back_text(tok: Tokenizer) -> None:
    ids = tok.encode("Hello world").ids
    detok = IncrementalDetokenizer(tok, [], stop=["zzz"])
    streamed = "".join(detok.add_tokens([i]) for i in ids)
    assert streamed == "Hello wor"  # the last len("zzz") - 1 characters are held back
    assert detok.flush() == "ld"
    assert detok.output_text == "Hello world"
    assert detok.stopped_by is None


def test_flush_emits_incomplete_utf8_tail_as_decode_does(tok: Tokenizer) -> None:
    ids = tok.encode("ok 世").ids[:-1]  # drop the last byte of 世
    detok = IncrementalDetokenizer(tok, [])
    streamed = "".join(detok.add_tokens([i]) for i in ids)
    assert streamed == "ok "
    assert streamed + detok.flush() == tok.decode(ids) == "ok \ufffd"


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens(tok: Tokenizer, skip: bool) -> None:
    eos = tok.token_to_id("</s>")
    ids = tok.encode("Hello world").ids + [eos] + tok.encode(" again").ids
    detok = IncrementalDetokenizer(tok, [tok.token_to_id("<s>")], skip_special_tokens=skip)
    text = "".join(stream(detok, ids))
    assert text == ("Hello world again" if skip else "Hello world</s> again")
    assert text == tok.decode(ids, skip_special_tokens=skip)


def test_stop_string_made_of_special_token_text(tok: Tokenizer) -> None:
    eos = tok.token_to_id("</s>")
    ids = tok.encode("Hello").ids + [eos] + tok.encode(" world").ids
    shown = IncrementalDetokenizer(tok, [], skip_special_tokens=False, stop=["</s>"])
    assert "".join(stream(shown, ids)) == "Hello"
    hidden = IncrementalDetokenizer(tok, [], skip_special_tokens=True, stop=["</s>"])
    assert "".join(stream(hidden, ids)) == "Hello world"


@pytest.mark.parametrize("seed", range(60))
def test_random_stops_match_whole_text_reference(tok: Tokenizer, seed: int) -> None:
    rng = random.Random(seed)
    text = " ".join(rng.choice(SAMPLES) for _ in range(3))
    ids = tok.encode(text).ids
    stops = []
    for _ in range(rng.randrange(1, 4)):
        n = rng.randrange(1, 7)
        start = rng.randrange(len(text) - n)
        stops.append(text[start : start + n] if rng.random() < 0.8 else "never-here")
    include = rng.random() < 0.5
    detok = IncrementalDetokenizer(tok, tok.encode("Q: ").ids, stop=stops, include_stop_str_in_output=include)
    deltas = stream(detok, ids, chunk=rng.choice([1, 1, 2, 4]))
    expected, stopped_by = stop_reference(text, stops, include)
    assert "".join(deltas) == expected
    assert detok.stopped_by == stopped_by
    assert detok.output_text == expected


def test_holdback_never_exceeds_longest_stop(tok: Tokenizer) -> None:
    ids = tok.encode(SAMPLES[1]).ids
    detok = IncrementalDetokenizer(tok, [], stop=["@@@@"])
    for n, i in enumerate(ids, 1):
        detok.add_tokens([i])
        full = tok.decode(ids[:n])
        assert full.startswith(detok.output_text)
        assert len(full) - len(detok.output_text) <= 3 or full.endswith("\ufffd")


class DecodeSpy:
    """Real tokenizer wrapper that records how many ids each decode() call sees."""

    def __init__(self, inner: Tokenizer) -> None:
        self.inner = inner
        self.sizes: list[int] = []

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        self.sizes.append(len(ids))
        return self.inner.decode(ids, skip_special_tokens=skip_special_tokens)


def test_decode_window_stays_bounded(tok: Tokenizer) -> None:
    ids = tok.encode(" ".join(SAMPLES) * 20).ids
    assert len(ids) > 1000
    spy = DecodeSpy(tok)
    detok = IncrementalDetokenizer(spy, tok.encode("Prompt text here").ids)  # type: ignore[arg-type]
    text = "".join(stream(detok, ids))
    assert text == tok.decode(ids)
    assert max(spy.sizes) <= 12
    assert len(detok._window.ids) < 300  # old ids are trimmed


def test_rejects_bad_stop_strings(tok: Tokenizer) -> None:
    with pytest.raises(ValueError):
        IncrementalDetokenizer(tok, [], stop=[""])
    with pytest.raises(TypeError):
        IncrementalDetokenizer(tok, [], stop="STOP")  # type: ignore[arg-type]


def test_add_tokens_after_flush_raises(tok: Tokenizer) -> None:
    detok = IncrementalDetokenizer(tok, [])
    detok.add_tokens(tok.encode("hi").ids)
    detok.flush()
    assert detok.finished
    assert detok.flush() == ""
    with pytest.raises(RuntimeError):
        detok.add_tokens([1])

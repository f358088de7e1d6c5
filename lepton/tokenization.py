"""The tokenizer stage: text or chat messages -> token ids and counts, and token ids -> text.

Batched Triton tensors in and out (a leading batch dimension on every tensor), no Triton import; the
texts of every request Triton batched together are tokenized in one call.
The ids are the engine's own: the same tokenizer, special tokens and chat template, so a count
here is the count the engine checks against the model's context.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

from lepton.errors import ConfigError, InvalidRequest, ModelFolderError
from lepton.model_folder import ModelFolder
from lepton.protocol import MAX_PROMPT_TOKENS, read_messages, read_text
from lepton.tokenizer import Tokenizer

ENCODE_INPUTS = ("text_input", "messages")
DECODE_INPUT = "input_ids"
PAD_ID = -1  # NOTE: never a token, so a padded row sent on without its num_tokens is refused, not misread


@dataclass(frozen=True)
class TokenizerConfig:
    """config.pbtxt parameters of the tokenizer model."""

    model_dir: Path  # a model folder or an export folder: tokenizer.json, config.json, tokenizer_config.json

    @classmethod
    def from_parameters(cls, params: Mapping[str, str], base_dir: Path | None = None) -> "TokenizerConfig":
        """Build from config.pbtxt parameters; unknown keys are an error."""
        unknown = sorted(set(params) - {"model_dir"})
        if unknown:
            raise ConfigError(f"unknown parameter(s) {', '.join(unknown)}; known parameters: model_dir")
        if "model_dir" not in params:
            raise ConfigError("model_dir: required parameter is missing")
        model_dir = Path(params["model_dir"]).expanduser()
        if not model_dir.is_absolute() and base_dir is not None:
            model_dir = base_dir / model_dir
        return cls(model_dir=model_dir.resolve())


def open_tokenizer(path: Path) -> Tokenizer:
    """The tokenizer of a model or export folder; no weights are needed or read."""
    path = Path(path).resolve()
    for name in ("config.json", "tokenizer.json"):
        if not (path / name).is_file():
            raise ModelFolderError(f"{path}: no {name}; expected a model folder or an ONNX export folder")
    config = json.loads((path / "config.json").read_text())
    folder = ModelFolder(path=path, config=config, weight_files=(), tokenizer_file=path / "tokenizer.json")
    return Tokenizer.from_folder(folder)


@dataclass(frozen=True)
class _Texts:
    """An encode request's texts, waiting to be tokenized with the rest of the batch."""

    texts: list[str]
    add_special_tokens: bool  # NOTE: false for rendered chats, as Tokenizer.encode_chat


def convert_batch(tokenizer: Tokenizer, requests: list[Mapping[str, np.ndarray]]) -> list[dict | Exception]:
    """Each request's output tensors, or its error; the texts of the whole batch are tokenized together."""
    parsed = [_parse(tokenizer, inputs) for inputs in requests]
    for special in (True, False):
        texts = [text for p in parsed if isinstance(p, _Texts) and p.add_special_tokens == special for text in p.texts]
        if not texts:
            continue
        # NOTE: one encode_batch call: the tokenizer spreads the batch over the cores, without the GIL.
        encoded = iter(e.ids for e in tokenizer.backend.encode_batch(texts, add_special_tokens=special))
        for i, p in enumerate(parsed):
            if isinstance(p, _Texts) and p.add_special_tokens == special:
                parsed[i] = _padded([next(encoded) for _ in p.texts])
    return parsed


def _parse(tokenizer: Tokenizer, inputs: Mapping[str, np.ndarray]) -> _Texts | dict | Exception:
    """An encode request's texts, a decode request's outputs, or the request's error."""
    given = [name for name in (*ENCODE_INPUTS, DECODE_INPUT) if name in inputs]
    try:
        if len(given) != 1:
            which = " and ".join(given) if given else "none"
            raise InvalidRequest(given[-1] if given else "text_input",
                                 f"give exactly one of text_input, messages, input_ids; got {which}")
        if given[0] == DECODE_INPUT:
            return decode(tokenizer, inputs)
        rows = _rows(inputs[given[0]], given[0])
        if given[0] == "text_input":
            return _Texts([read_text({"text_input": row}, "text_input") for row in rows], add_special_tokens=True)
        return _Texts([tokenizer.render_chat(read_messages({"messages": row})) for row in rows],
                      add_special_tokens=False)
    except Exception as exc:  # NOTE: this request's error; the batch goes on
        return exc


def _padded(ids: list[list[int]]) -> dict[str, np.ndarray]:
    """input_ids [B, max len] INT32, padded with PAD_ID, and num_tokens [B, 1]."""
    num_tokens = np.array([len(row) for row in ids], dtype=np.int32).reshape(-1, 1)
    padded = np.full((len(ids), int(num_tokens.max())), PAD_ID, dtype=np.int32)
    for i, row in enumerate(ids):
        padded[i, : len(row)] = row
    return {"input_ids": padded, "num_tokens": num_tokens}


def decode(tokenizer: Tokenizer, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """text_output [B, 1] of input_ids [B, L], each row cut to its num_tokens when given."""
    ids = inputs[DECODE_INPUT]
    if ids.dtype.kind not in "iu" or ids.ndim != 2:
        raise InvalidRequest(DECODE_INPUT, f"expected INT32 token ids of shape [batch, length], got {ids.dtype} "
                                           f"{list(ids.shape)}")
    if ids.shape[1] > MAX_PROMPT_TOKENS:
        raise InvalidRequest(DECODE_INPUT, f"at most {MAX_PROMPT_TOKENS} token ids a row, got {ids.shape[1]}")
    lengths = _lengths(inputs.get("num_tokens"), ids.shape)
    skip_special = _flag(inputs, "skip_special_tokens", default=True)
    vocab = tokenizer.vocab_size
    texts = []
    for row, length in zip(ids, lengths):
        row = row[:length]
        if row.size and (row.min() < 0 or row.max() >= vocab):
            bad = int(row[(row < 0) | (row >= vocab)][0])
            raise InvalidRequest(DECODE_INPUT, f"token ids must be in [0, {vocab}), got {bad}")
        texts.append(tokenizer.decode(row.tolist(), skip_special_tokens=skip_special).encode("utf-8"))
    return {"text_output": np.array(texts, dtype=np.object_).reshape(-1, 1), "num_tokens": lengths.reshape(-1, 1)}


def _rows(array: np.ndarray, name: str) -> list[np.ndarray]:
    if array.ndim != 2 or array.shape[1] != 1:
        raise InvalidRequest(name, f"expected shape [batch, 1], got {list(array.shape)}")
    return [array[i] for i in range(array.shape[0])]


def _lengths(num_tokens: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
    if num_tokens is None:
        return np.full(shape[0], shape[1], dtype=np.int32)
    lengths = num_tokens.reshape(-1)
    if lengths.size != shape[0] or lengths.dtype.kind not in "iu":
        raise InvalidRequest("num_tokens", f"expected one integer a row of input_ids ({shape[0]}), got "
                                           f"{lengths.dtype} {list(num_tokens.shape)}")
    if lengths.size and (lengths.min() < 0 or lengths.max() > shape[1]):
        raise InvalidRequest("num_tokens", f"must be in [0, {shape[1]}] (the row length of input_ids)")
    return lengths.astype(np.int32)


def _flag(inputs: Mapping[str, np.ndarray], name: str, default: bool) -> bool:
    if name not in inputs:
        return default
    values = inputs[name].reshape(-1)
    if values.dtype != np.bool_ or values.size == 0 or values.min() != values.max():
        raise InvalidRequest(name, "expected BOOL, the same for every row")
    return bool(values[0])

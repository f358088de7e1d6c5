"""The embeddings stage: texts -> the pooled, L2-normalized final hidden state of a Llama-family model.

Decoder-based embedding models (gte-Qwen2, e5-mistral) work this way: the last token's hidden state
(or the mean over the tokens) of a causal model, normalized. A request's rows and the other requests
Triton batched with it run as one padded forward pass without a KV cache (lepton.models.encoder).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from lepton.errors import ConfigError, InvalidRequest
from lepton.model_folder import ModelFolder
from lepton.models.encoder import hidden_states
from lepton.models.loader import load_model
from lepton.protocol import read_text
from lepton.sampling_params import show_value
from lepton.tokenizer import Tokenizer

POOLINGS = ("last", "mean")
DEFAULT_POOLING = "last"


@dataclass(frozen=True)
class EmbeddingsConfig:
    """config.pbtxt parameters of the embeddings model."""

    model_dir: Path  # a Llama / Qwen2 / Mistral folder with safetensors weights
    num_threads: int = 0  # torch intra-op threads of each instance; 0 = all cores but one
    max_batch_tokens: int = 8192  # padded tokens in one forward pass; a larger batch is split

    @classmethod
    def from_parameters(cls, params: Mapping[str, str], base_dir: Path | None = None) -> "EmbeddingsConfig":
        """Build from config.pbtxt parameters; unknown keys and bad values are errors."""
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(params) - set(known))
        if unknown:
            raise ConfigError(f"unknown parameter(s) {', '.join(unknown)}; known parameters: {', '.join(known)}")
        if "model_dir" not in params:
            raise ConfigError("model_dir: required parameter is missing")
        model_dir = Path(params["model_dir"]).expanduser()
        if not model_dir.is_absolute() and base_dir is not None:
            model_dir = base_dir / model_dir
        numbers = {}
        for name in ("num_threads", "max_batch_tokens"):
            if name in params:
                try:
                    numbers[name] = int(params[name])
                except ValueError:
                    raise ConfigError(f"{name}: expected int, got {params[name]!r}") from None
        config = cls(model_dir=model_dir.resolve(), **numbers)
        if config.num_threads < 0 or config.max_batch_tokens < 1:
            raise ConfigError(f"num_threads must be >= 0 and max_batch_tokens >= 1, got {config.num_threads} "
                              f"and {config.max_batch_tokens}")
        return config

    @property
    def compute_threads(self) -> int:
        return self.num_threads or max(1, len(os.sched_getaffinity(0)) - 1)


@dataclass(frozen=True)
class EmbeddingRequest:
    """One request's rows, tokenized and checked."""

    token_ids: list[list[int]]  # one row per text
    poolings: list[str]  # one per row


class Embedder:
    """A model folder's tokenizer and its weights in the step model, run as a dense encoder."""

    def __init__(self, config: EmbeddingsConfig) -> None:
        folder = ModelFolder.open(config.model_dir)
        torch.set_num_threads(config.compute_threads)
        self.config = config
        self.tokenizer = Tokenizer.from_folder(folder)
        self.model = load_model(folder, torch.float32, block_size=16)
        self.max_len = self.model.cfg.max_position_embeddings
        self.vocab_size = self.model.cfg.vocab_size

    @property
    def hidden_size(self) -> int:
        return self.model.cfg.hidden_size

    def parse(self, inputs: Mapping[str, np.ndarray]) -> EmbeddingRequest:
        """text_input [B, 1] (and pooling [B, 1], optional) -> rows of token ids; InvalidRequest if bad."""
        texts = inputs.get("text_input")
        if texts is None:
            raise InvalidRequest("text_input", "required input is missing")
        if texts.ndim != 2 or texts.shape[1] != 1:
            raise InvalidRequest("text_input", f"expected shape [batch, 1], got {list(texts.shape)}")
        rows = [read_text({"text_input": row}, "text_input") for row in texts]
        token_ids = [e.ids for e in self.tokenizer.backend.encode_batch(rows, add_special_tokens=True)]
        for ids in token_ids:
            if not ids:
                raise InvalidRequest("text_input", "the text is empty")
            if len(ids) > self.max_len:
                raise InvalidRequest("text_input", f"{len(ids)} tokens; the model's context is {self.max_len} tokens")
            if max(ids) >= self.vocab_size:
                raise InvalidRequest("text_input", f"token id {max(ids)} is past the model's vocabulary")
        return EmbeddingRequest(token_ids, _poolings(inputs.get("pooling"), len(rows)))

    def embed(self, requests: list[EmbeddingRequest]) -> list[np.ndarray]:
        """Each request's embeddings [rows, hidden] (float32, unit length), computed together."""
        rows = [(ids, pooling) for request in requests for ids, pooling in zip(request.token_ids, request.poolings)]
        vectors = np.empty((len(rows), self.hidden_size), dtype=np.float32)
        for chunk in _chunks(sorted(range(len(rows)), key=lambda i: -len(rows[i][0])), rows,
                             self.config.max_batch_tokens):
            vectors[chunk] = self._embed_rows([rows[i] for i in chunk])
        out, start = [], 0
        for request in requests:
            out.append(vectors[start: start + len(request.token_ids)])
            start += len(request.token_ids)
        return out

    def _embed_rows(self, rows: list[tuple[list[int], str]]) -> np.ndarray:
        lengths = torch.tensor([len(ids) for ids, _ in rows])
        input_ids = torch.zeros(len(rows), int(lengths.max()), dtype=torch.long)
        for i, (ids, _) in enumerate(rows):
            input_ids[i, : len(ids)] = torch.tensor(ids)
        hidden = hidden_states(self.model, input_ids, lengths)
        pooled = []
        for i, (_, pooling) in enumerate(rows):
            states = hidden[i, : lengths[i]]
            pooled.append(states[-1] if pooling == "last" else states.mean(dim=0))
        return torch.nn.functional.normalize(torch.stack(pooled).float(), dim=-1).numpy()


def _poolings(array: np.ndarray | None, num_rows: int) -> list[str]:
    if array is None:
        return [DEFAULT_POOLING] * num_rows
    values = array.reshape(-1)
    if values.size != num_rows:
        raise InvalidRequest("pooling", f"expected one value a row of text_input ({num_rows}), got {values.size}")
    poolings = [read_text({"pooling": np.array([v], dtype=np.object_)}, "pooling").strip().lower() for v in values]
    for pooling in poolings:
        if pooling not in POOLINGS:
            raise InvalidRequest("pooling", f"must be one of {', '.join(POOLINGS)}, got {show_value(pooling)}")
    return poolings


def _chunks(order: list[int], rows: list, max_batch_tokens: int) -> list[list[int]]:
    """Consecutive runs of order (longest first) whose padded size stays within max_batch_tokens."""
    chunks: list[list[int]] = []
    for i in order:
        # NOTE: sorted longest first, so a chunk's first row sets its padded length.
        if chunks and (len(chunks[-1]) + 1) * len(rows[chunks[-1][0]][0]) <= max_batch_tokens:
            chunks[-1].append(i)
        else:
            chunks.append([i])
    return chunks

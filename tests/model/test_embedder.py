"""The embeddings stage in process: the dense forward pass against transformers, splitting, config."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModel

from lepton.embedding import Embedder, EmbeddingsConfig
from lepton.errors import ConfigError, InvalidRequest
from lepton.models.encoder import hidden_states
from lepton.tokenization import TokenizerConfig

TEXTS = ["Hello", "The quick brown fox jumps over the lazy dog.", "Return the number of items. " * 20, "a b"]


@pytest.fixture(scope="module")
def embedder(demo_model_dir) -> Embedder:
    return Embedder(EmbeddingsConfig.from_parameters({"model_dir": str(demo_model_dir)}))


def request(embedder: Embedder, texts, pooling="last"):
    return embedder.parse({"text_input": np.array([[t.encode()] for t in texts], dtype=np.object_),
                           "pooling": np.array([[pooling.encode()]] * len(texts), dtype=np.object_)})


def test_padded_batch_hidden_states_equal_transformers_per_sequence(embedder, demo_model_dir):
    reference = AutoModel.from_pretrained(demo_model_dir, dtype=torch.float32).eval()
    rows = request(embedder, TEXTS).token_ids
    lengths = torch.tensor([len(r) for r in rows])
    input_ids = torch.full((len(rows), int(lengths.max())), 7, dtype=torch.long)  # NOTE: padding is any id
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row)
    hidden = hidden_states(embedder.model, input_ids, lengths)
    for i, row in enumerate(rows):
        with torch.no_grad():
            want = reference(input_ids=torch.tensor([row])).last_hidden_state[0]
        assert (hidden[i, : len(row)] - want).abs().max() < 1e-4


def test_a_batch_split_by_max_batch_tokens_equals_one_pass(embedder, demo_model_dir):
    small = Embedder(EmbeddingsConfig.from_parameters({"model_dir": str(demo_model_dir), "max_batch_tokens": "32"}))
    for pooling in ("last", "mean"):
        whole = embedder.embed([request(embedder, TEXTS, pooling)])[0]
        split = small.embed([request(small, TEXTS[:1], pooling), request(small, TEXTS[1:], pooling)])
        assert np.abs(np.concatenate(split) - whole).max() < 1e-5
        assert np.allclose(np.linalg.norm(whole, axis=1), 1.0, atol=1e-6)
    assert not np.allclose(embedder.embed([request(embedder, TEXTS[1:2], "mean")])[0],
                           embedder.embed([request(embedder, TEXTS[1:2], "last")])[0])


def test_requests_are_checked(embedder):
    with pytest.raises(InvalidRequest, match="text_input: 2.* tokens; the model's context is 1024"):
        request(embedder, ["word " * 2000])
    with pytest.raises(InvalidRequest, match="pooling: must be one of last, mean, got 'cls'"):
        request(embedder, ["Hi"], "cls")
    with pytest.raises(InvalidRequest, match=r"text_input: expected shape \[batch, 1\]"):
        embedder.parse({"text_input": np.array([b"a", b"b"], dtype=np.object_)})


@pytest.mark.parametrize("cls,params,words", [
    (EmbeddingsConfig, {"model_dir": "x", "pooling": "mean"}, "unknown parameter(s) pooling"),
    (EmbeddingsConfig, {"model_dir": "x", "max_batch_tokens": "many"}, "max_batch_tokens: expected int"),
    (EmbeddingsConfig, {"model_dir": "x", "max_batch_tokens": "0"}, "max_batch_tokens >= 1"),
    (EmbeddingsConfig, {}, "model_dir: required"),
    (TokenizerConfig, {"model_dir": "x", "runner": "torch"}, "unknown parameter(s) runner"),
])
def test_configs_refuse_unknown_keys_and_bad_values(cls, params, words):
    with pytest.raises(ConfigError) as info:
        cls.from_parameters(params)
    assert words in str(info.value)

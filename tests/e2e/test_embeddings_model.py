"""The embeddings model through the real server: batched equals one at a time, equals transformers."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from tritonclient.utils import InferenceServerException
from transformers import AutoModel, AutoTokenizer

from stageio import batch_stats, infer

pytestmark = pytest.mark.e2e

TEXTS = ["Hello", "The quick brown fox jumps over the lazy dog.", "Return the number of items in a container. " * 12,
         "caf\u00e9 \u2603 \U0001f600", "a b c d e f g", "def f(x):\n    return x * 2\n", "x" * 300, "Why?"]
# NOTE: batched and one-at-a-time runs differ only in matrix shapes (float32 summation order):
# measured 2e-7 on the demo model, 5e-7 on SmolLM2-135M; vectors have unit length.
BATCH_TOLERANCE = 1e-5
REFERENCE_TOLERANCE = 1e-4  # against transformers' own forward pass (measured 4e-7)


def embed(server, texts, pooling=None) -> np.ndarray:
    inputs = {"text_input": texts}
    if pooling is not None:
        inputs["pooling"] = [pooling] * len(texts)
    return infer(server.grpc_url, "embeddings", inputs, ("embedding",))["embedding"]


@pytest.fixture(scope="module")
def one_at_a_time(server) -> dict[str, np.ndarray]:
    return {pooling: np.concatenate([embed(server, [t], pooling) for t in TEXTS]) for pooling in ("last", "mean")}


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_one_batched_request_equals_one_at_a_time(server, one_at_a_time, pooling):
    before = batch_stats(server.grpc_url, "embeddings").get(len(TEXTS), 0)
    batched = embed(server, TEXTS, pooling)
    # NOTE: one run of 8. Triton records an execution's statistics once it completes, which may be just
    # after the client has its response (seen once under load: the count read before it was recorded).
    deadline = time.monotonic() + 5.0
    runs = batch_stats(server.grpc_url, "embeddings").get(len(TEXTS), 0)
    while runs == before and time.monotonic() < deadline:
        time.sleep(0.05)
        runs = batch_stats(server.grpc_url, "embeddings").get(len(TEXTS), 0)
    assert runs == before + 1
    assert batched.shape == one_at_a_time[pooling].shape
    assert np.abs(batched - one_at_a_time[pooling]).max() < BATCH_TOLERANCE


def test_concurrent_requests_batched_by_triton_equal_one_at_a_time(server, one_at_a_time):
    with ThreadPoolExecutor(len(TEXTS) * 2) as pool:
        results = list(pool.map(lambda t: embed(server, [t], "last"), TEXTS * 2))
    assert np.abs(np.concatenate(results) - np.tile(one_at_a_time["last"], (2, 1))).max() < BATCH_TOLERANCE


def test_vectors_are_transformers_hidden_states_pooled_and_normalized(server, demo_model_dir, one_at_a_time):
    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir)
    model = AutoModel.from_pretrained(demo_model_dir, dtype=torch.float32).eval()
    for i, text in enumerate(TEXTS):
        with torch.no_grad():
            hidden = model(**tokenizer(text, return_tensors="pt")).last_hidden_state[0]
        last = torch.nn.functional.normalize(hidden[-1], dim=-1).numpy()
        mean = torch.nn.functional.normalize(hidden.mean(dim=0), dim=-1).numpy()
        assert np.abs(one_at_a_time["last"][i] - last).max() < REFERENCE_TOLERANCE
        assert np.abs(one_at_a_time["mean"][i] - mean).max() < REFERENCE_TOLERANCE
    assert np.allclose(np.linalg.norm(one_at_a_time["last"], axis=1), 1.0, atol=1e-6)


def test_default_pooling_is_last_and_counts_are_reported(server, one_at_a_time):
    out = infer(server.grpc_url, "embeddings", {"text_input": TEXTS[:2]}, ("embedding", "num_tokens"))
    assert np.abs(out["embedding"] - one_at_a_time["last"][:2]).max() < BATCH_TOLERANCE
    counts = infer(server.grpc_url, "tokenizer", {"text_input": TEXTS[:2]}, ("num_tokens",))["num_tokens"]
    assert out["num_tokens"].tolist() == counts.tolist()


@pytest.mark.parametrize("inputs,words", [
    ({"text_input": ["Hi"], "pooling": ["max"]}, ["pooling", "last, mean", "max"]),
    ({"text_input": ["Hi", "there"], "pooling": ["mean", "cls"]}, ["pooling", "cls"]),
    ({"text_input": ["word " * 1100]}, ["text_input", "context is 1024 tokens"]),
    ({"text_input": [b"\xff"]}, ["text_input", "UTF-8"]),
])
def test_bad_input_is_refused_naming_the_field(server, inputs, words):
    with pytest.raises(InferenceServerException) as info:
        infer(server.grpc_url, "embeddings", inputs, ("embedding",))
    message = str(info.value)
    assert all(word in message for word in words), message
    assert embed(server, ["still serving"]).shape == (1, 128)

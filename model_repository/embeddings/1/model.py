"""Triton Python backend for the embeddings stage: one forward pass per batch Triton hands over."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from lepton.embedding import Embedder, EmbeddingsConfig
from lepton.errors import InvalidRequest, describe
from lepton.lifetime import exit_with_parent
from lepton.triton_errors import triton_error


class TritonPythonModel:
    def initialize(self, args):
        exit_with_parent()  # NOTE: this stub must not outlive tritonserver
        model_config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in model_config.get("parameters", {}).items()}
        config = EmbeddingsConfig.from_parameters(params, base_dir=Path(args["model_repository"]))
        self.embedder = Embedder(config)
        pb_utils.Logger.log_info(f"embeddings: {config.model_dir}, {config.compute_threads} threads")

    def execute(self, requests):
        parsed = [self._parse(request) for request in requests]
        try:
            vectors = iter(self.embedder.embed([p for p in parsed if not isinstance(p, Exception)]))
            return [_error(p) if isinstance(p, Exception) else _response(p, next(vectors)) for p in parsed]
        except Exception as exc:  # NOTE: the forward pass failed: each request of the batch says so
            pb_utils.Logger.log_error(f"embeddings: a batch failed: {exc!r}")
            return [_error(p if isinstance(p, Exception) else exc) for p in parsed]

    def _parse(self, request):
        inputs = {t.name(): t.as_numpy() for t in request.inputs()}
        try:
            return self.embedder.parse(inputs)
        except Exception as exc:  # NOTE: never a traceback to the client, never the whole batch
            if not isinstance(exc, InvalidRequest):
                pb_utils.Logger.log_error(f"embeddings: parsing a request failed: {exc!r}")
            return exc


def _response(parsed, vectors):
    num_tokens = np.array([[len(ids)] for ids in parsed.token_ids], dtype=np.int32)
    return pb_utils.InferenceResponse(output_tensors=[
        pb_utils.Tensor("embedding", vectors), pb_utils.Tensor("num_tokens", num_tokens),
    ])


def _error(exc: Exception):
    return pb_utils.InferenceResponse(error=triton_error(*describe(exc)))

"""Triton Python backend for the tokenizer stage: hands each batch of requests to lepton.tokenization."""

from __future__ import annotations

import json
from pathlib import Path

import triton_python_backend_utils as pb_utils

from lepton.errors import InvalidRequest, describe
from lepton.lifetime import exit_with_parent
from lepton.tokenization import TokenizerConfig, convert_batch, open_tokenizer
from lepton.triton_errors import triton_error


class TritonPythonModel:
    def initialize(self, args):
        exit_with_parent()  # NOTE: this stub must not outlive tritonserver
        model_config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in model_config.get("parameters", {}).items()}
        config = TokenizerConfig.from_parameters(params, base_dir=Path(args["model_repository"]))
        self.tokenizer = open_tokenizer(config.model_dir)
        pb_utils.Logger.log_info(f"tokenizer: {config.model_dir}")

    def execute(self, requests):
        inputs = [{t.name(): t.as_numpy() for t in request.inputs()} for request in requests]
        try:
            outputs = convert_batch(self.tokenizer, inputs)
        except Exception as exc:  # NOTE: tokenizing the batch failed: each of its requests says so
            outputs = [exc] * len(requests)
        return [_response(output) for output in outputs]


def _response(output):
    if isinstance(output, Exception):  # NOTE: never a traceback to the client
        if not isinstance(output, InvalidRequest):
            pb_utils.Logger.log_error(f"tokenizer: a request failed: {output!r}")
        return pb_utils.InferenceResponse(error=triton_error(*describe(output)))
    return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(k, v) for k, v in output.items()])

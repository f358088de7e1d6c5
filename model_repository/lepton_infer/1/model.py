"""Triton Python backend (not decoupled) for plain `infer`: forwards to `lepton` and returns one response.

HTTP `/infer` and gRPC `ModelInfer` do not accept decoupled models, so this model hands the
request to the decoupled `lepton` model through BLS and returns its single, whole completion.
"""

from __future__ import annotations

import json

import triton_python_backend_utils as pb_utils

from lepton.errors import InvalidRequest, describe, kind_of_message
from lepton.lifetime import exit_with_parent
from lepton.protocol import refuse_parameters
from lepton.triton_errors import triton_error

TARGET_MODEL = "lepton"
OUTPUTS = ["text_output", "finish_reason", "num_input_tokens", "num_output_tokens", "logprobs"]


class TritonPythonModel:
    def initialize(self, args):
        exit_with_parent()  # NOTE: this stub must not outlive tritonserver

    def execute(self, requests):
        return [self._forward(request) for request in requests]

    def _forward(self, request):
        try:  # NOTE: BLS would drop them; lepton refuses them, so they are refused here too
            refuse_parameters(json.loads(request.parameters() or "{}"))
        except InvalidRequest as exc:
            return pb_utils.InferenceResponse(error=triton_error(*describe(exc)))
        bls = pb_utils.InferenceRequest(
            model_name=TARGET_MODEL, inputs=request.inputs(), requested_output_names=OUTPUTS,
        )
        result = None
        for response in bls.exec(decoupled=True):
            if response.has_error():
                # NOTE: BLS hands every error back as INTERNAL; the code is recovered from the message.
                message = response.error().message()
                return pb_utils.InferenceResponse(error=triton_error(kind_of_message(message), message))
            if response.output_tensors():
                result = response
        if result is None:
            return pb_utils.InferenceResponse(error=pb_utils.TritonError("lepton returned no output"))
        tensors = [pb_utils.get_output_tensor_by_name(result, name) for name in OUTPUTS]
        return pb_utils.InferenceResponse(output_tensors=[t for t in tensors if t is not None])

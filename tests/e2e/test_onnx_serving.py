"""The ONNX Runtime runner behind a real tritonserver: greedy text equals transformers."""

from __future__ import annotations

import pytest

from reference import MAX_TOKENS, PROMPTS
from tritonio import grpc_generate

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def onnx_server(demo_model_dir, tmp_path_factory, start_triton):
    from export.onnx_export import ExportOptions, export_onnx

    export_dir = tmp_path_factory.mktemp("onnx") / "demo"
    # NOTE: torchscript exports ~4x faster than dynamo; both are validated against PyTorch.
    export_onnx(ExportOptions(model_dir=demo_model_dir, out_dir=export_dir, exporter="torchscript"))
    server = start_triton(export_dir, tmp_path_factory.mktemp("triton-onnx"), {"runner": "onnxruntime"})
    yield server
    server.stop()


@pytest.mark.parametrize("prompt", PROMPTS)
def test_onnxruntime_greedy_equals_transformers(onnx_server, reference, prompt):
    fields = {"text_input": prompt, "max_tokens": MAX_TOKENS, "temperature": 0.0, "ignore_eos": True,
              "exclude_input_in_output": True, "stream": True}
    reply = grpc_generate(onnx_server.grpc_url, fields)
    assert reply.text == reference[prompt]
    assert reply.num_output_tokens == MAX_TOKENS


def test_the_slot_graph_is_served_with_leptons_attention_operator(onnx_server):
    # NOTE: attention=auto serves the slot graph, attention_kernel=auto Lepton's operator (make setup builds it)
    log = onnx_server.log_file.read_text()
    assert "[lepton] attention=slots: Lepton's SlotAttention (" in log and "liblepton_ops.so)" in log, log[-3000:]

"""Generation through a real tritonserver: greedy output equals transformers, over every protocol."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from lepton.model_folder import ModelFolder
from lepton.tokenizer import Tokenizer
from reference import MAX_TOKENS, MIN_MARGIN, PROMPTS
from tritonio import grpc_generate, http_generate, http_generate_stream, make_inputs

pytestmark = pytest.mark.e2e

def greedy_fields(prompt: str, **extra) -> dict:
    return {"text_input": prompt, "max_tokens": MAX_TOKENS, "temperature": 0.0, "ignore_eos": True,
            "exclude_input_in_output": True, **extra}


@pytest.mark.parametrize("prompt", PROMPTS)
def test_grpc_stream_greedy_equals_transformers(server, reference, prompt):
    reply = grpc_generate(server.grpc_url, greedy_fields(prompt, stream=True))
    assert reply.text == reference[prompt]
    assert reply.finish_reason == "length"
    assert reply.num_output_tokens == MAX_TOKENS
    assert len(reply.texts) > 1  # streamed in pieces, not one response


def test_every_protocol_returns_the_same_greedy_text(server, reference):
    prompt = PROMPTS[1]
    fields = greedy_fields(prompt)
    assert grpc_generate(server.grpc_url, {**fields, "stream": False}).texts == [reference[prompt]]
    assert http_generate(server.http_url, fields).text == reference[prompt]
    assert http_generate_stream(server.http_url, {**fields, "stream": True}).text == reference[prompt]
    client = httpclient.InferenceServerClient(server.http_url)
    result = client.infer("lepton_infer", make_inputs(fields, protocol=httpclient))
    assert result.as_numpy("text_output")[0].decode() == reference[prompt]
    grpc = grpcclient.InferenceServerClient(server.grpc_url)
    result = grpc.infer("lepton_infer", make_inputs(fields))
    assert result.as_numpy("text_output")[0].decode() == reference[prompt]


def test_sixteen_concurrent_greedy_requests_of_different_lengths_match_alone(server):
    """Requests batched together (chunked prefills among decodes) return the tokens each returns alone."""
    words = "Return a new list containing all items from the iterable in ascending order . ".split()
    params = json.dumps({"logprobs": 2})
    fields = [{**greedy_fields(" ".join(words[: 2 + (i * 7) % 60] * (1 + i // 6)), stream=True),
               "max_tokens": 8 + (i * 5) % 30, "sampling_parameters": params} for i in range(16)]
    alone = [grpc_generate(server.grpc_url, f).logprobs for f in fields]
    with ThreadPoolExecutor(len(fields)) as pool:
        together = list(pool.map(lambda f: grpc_generate(server.grpc_url, f).logprobs, fields))
    for solo, batched in zip(alone, together):
        solo_ids, batched_ids = [e["token_id"] for e in solo], [e["token_id"] for e in batched]
        if solo_ids != batched_ids:
            # NOTE: batch shapes change float rounding only; a different token must be a near tie.
            step = next(k for k, (a, b) in enumerate(zip(solo_ids, batched_ids)) if a != b)
            top = solo[step]["top_logprobs"]
            assert top[0][1] - top[1][1] < MIN_MARGIN, f"step {step}: {solo_ids} != {batched_ids}"


def test_vllm_style_request_and_prompt_echo(server, reference):
    """genai-perf's --backend vllm shape; without exclude_input_in_output the prompt is echoed."""
    prompt = PROMPTS[0]
    params = json.dumps({"max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True})
    reply = grpc_generate(server.grpc_url, {"text_input": prompt, "stream": False, "sampling_parameters": params})
    assert reply.text == prompt + reference[prompt]
    assert reply.num_input_tokens == len(Tokenizer.from_folder(ModelFolder.open(server.options.model_dir)).encode(prompt))


def test_tensor_input_overrides_sampling_parameters(server):
    params = json.dumps({"max_tokens": 50, "temperature": 0})
    reply = grpc_generate(server.grpc_url, {"text_input": "Hello", "sampling_parameters": params,
                                            "max_tokens": 3, "ignore_eos": True})
    assert reply.num_output_tokens == 3 and reply.finish_reason == "length"


def test_stop_string_cuts_output(server, reference):
    prompt = PROMPTS[1]
    full = reference[prompt]
    stop = full[len(full) // 2: len(full) // 2 + 3]
    reply = grpc_generate(server.grpc_url, greedy_fields(prompt, stream=True, stop=[stop]))
    assert reply.finish_reason == "stop"
    assert reply.text == full[: full.index(stop)]


def test_seeded_sampling_is_reproducible(server):
    fields = {"text_input": "The quick", "max_tokens": 16, "temperature": 1.0, "top_p": 0.9,
              "seed": 1234, "ignore_eos": True, "exclude_input_in_output": True}
    first = grpc_generate(server.grpc_url, fields).text
    assert grpc_generate(server.grpc_url, fields).text == first
    assert grpc_generate(server.grpc_url, {**fields, "seed": 99}).text != first


def test_logprobs_on_request(server):
    params = json.dumps({"max_tokens": 4, "temperature": 0, "logprobs": 3, "ignore_eos": True})
    client = httpclient.InferenceServerClient(server.http_url)
    fields = {"text_input": "Hello", "sampling_parameters": params}
    result = client.infer("lepton_infer", make_inputs(fields, protocol=httpclient))
    entries = json.loads(result.as_numpy("logprobs")[0])
    assert len(entries) == 4
    for entry in entries:
        top = entry["top_logprobs"]
        assert len(top) == 3 and top[0][0] == entry["token_id"]  # greedy: the sampled token is the top one
        assert entry["logprob"] == pytest.approx(top[0][1]) and entry["logprob"] <= 0
    plain = client.infer("lepton_infer", make_inputs({"text_input": "Hello", "max_tokens": 2}, protocol=httpclient))
    assert plain.as_numpy("logprobs") is None

"""The real model through the whole stack: SmolLM2 behind tritonserver and the OpenAI API.

Quality smoke (issue 8): greedy answers to fixed questions through `/v1/chat/completions` equal
transformers' greedy answers on the same folder, token for token.
"""

from __future__ import annotations

import openai
import pytest

from export.smollm2 import build_smollm2, greedy_ids
from lepton.server import PROJECT_ROOT
from openai_api.config import ApiConfig
from openai_api.server import ApiServer
from tests.conftest import free_port

pytestmark = pytest.mark.e2e

SMOLLM2_MODEL = PROJECT_ROOT / "build" / "models" / "smollm2-135m-instruct"
QUESTIONS = ["What is the capital of France?", "Name three colors of the rainbow.",
             "Write one sentence about the sea."]
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def smollm2_api(start_triton, tmp_path_factory):
    build_smollm2(SMOLLM2_MODEL)
    triton = start_triton(SMOLLM2_MODEL, tmp_path_factory.mktemp("smollm2"),
                          {"runner": "torch", "max_model_len": "1024", "kv_cache_memory_bytes": "96M"})
    api = ApiServer(ApiConfig(port=free_port(), triton_url=triton.grpc_url, log_level="warning")).start()
    yield api
    api.stop()
    triton.stop()


@pytest.fixture(scope="module")
def transformers_answers():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(SMOLLM2_MODEL, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(SMOLLM2_MODEL, dtype=torch.float32, use_safetensors=True,
                                                 local_files_only=True).eval()
    answers = {}
    for question in QUESTIONS:
        text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                             add_generation_prompt=True)
        prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids = list(greedy_ids(model, prompt, MAX_TOKENS))
        if tokenizer.convert_tokens_to_ids("<|im_end|>") in ids:
            ids = ids[: ids.index(tokenizer.convert_tokens_to_ids("<|im_end|>"))]
        answers[question] = (len(prompt), tokenizer.decode(ids, skip_special_tokens=True), len(ids))
    return answers


@pytest.mark.parametrize("question", QUESTIONS)
def test_chat_answers_equal_transformers(smollm2_api, transformers_answers, question):
    client = openai.OpenAI(base_url=smollm2_api.url, api_key="unused", max_retries=0, timeout=120)
    reply = client.chat.completions.create(model=smollm2_api.model, temperature=0, max_tokens=MAX_TOKENS,
                                           messages=[{"role": "user", "content": question}])
    prompt_tokens, text, num_tokens = transformers_answers[question]
    assert reply.choices[0].message.content == text
    assert reply.usage.prompt_tokens == prompt_tokens
    assert reply.usage.completion_tokens in (num_tokens, num_tokens + 1)  # NOTE: + the eos, when it stopped


def test_the_capital_of_france_streams(smollm2_api):
    client = openai.OpenAI(base_url=smollm2_api.url, api_key="unused", max_retries=0, timeout=120)
    stream = client.chat.completions.create(model=smollm2_api.model, stream=True, temperature=0,
                                            messages=[{"role": "user", "content": QUESTIONS[0]}])
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text == "The capital of France is Paris."

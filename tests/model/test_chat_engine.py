"""Chat prompts in the engine: the template's tokens, equal to transformers' apply_chat_template."""

from __future__ import annotations

import shutil

import pytest

from lepton.chat import parse_messages
from lepton.config import EngineConfig
from lepton.engine import LLMEngine
from lepton.errors import InvalidRequest
from lepton.sampling_params import SamplingParams

MESSAGES = [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "What is a list?"}]


def make_engine(model_dir) -> LLMEngine:
    return LLMEngine(EngineConfig.from_parameters({"model_dir": str(model_dir)}))


def test_chat_prompt_tokens_equal_transformers(demo_model_dir):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(demo_model_dir))
    expected = hf.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=False)
    engine = make_engine(demo_model_dir)
    prepared = engine.prepare("c", parse_messages(MESSAGES), SamplingParams(max_tokens=4))
    assert prepared.prompt_token_ids == list(expected)
    # NOTE: the template writes its own special tokens; nothing is added twice
    assert prepared.prompt_token_ids.count(engine.tokenizer.bos_token_id) <= 1


def test_a_model_without_chat_template_refuses_messages(demo_model_dir, tmp_path):
    folder = tmp_path / "no-template"
    shutil.copytree(demo_model_dir, folder)
    config = (folder / "tokenizer_config.json").read_text()
    import json

    data = json.loads(config)
    data.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(data))
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    engine = make_engine(folder)
    with pytest.raises(InvalidRequest) as info:
        engine.prepare("c", parse_messages(MESSAGES), SamplingParams(max_tokens=4))
    assert info.value.field == "messages" and "no chat template" in str(info.value)
    assert engine.prepare("t", "plain text still works", SamplingParams(max_tokens=4)).prompt_token_ids

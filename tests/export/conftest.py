"""Tiny model folders (built from configs, random weights) and their ONNX exports, once per session."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from export.onnx_export import ExportOptions, export_onnx

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.1)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
BLOCK_SIZE = 8


def build_tiny_model(out: Path, tokenizer_dir: Path, kind: str) -> Path:
    """A 2-layer GQA model of the given kind ("llama", "qwen2", "llama3_rope") with the demo tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json")).get_vocab_size()
    configs = {
        "llama": lambda: LlamaConfig(vocab_size=vocab, tie_word_embeddings=True, **TINY),
        "qwen2": lambda: Qwen2Config(vocab_size=vocab, tie_word_embeddings=False, **TINY),
        "llama3_rope": lambda: LlamaConfig(vocab_size=vocab, rope_parameters=LLAMA3_ROPE, **TINY),
    }
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(configs[kind]()).to(torch.float32)
    model.save_pretrained(out, safe_serialization=True)
    for name in TOKENIZER_FILES:
        shutil.copy2(tokenizer_dir / name, out / name)
    return out


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, demo_model_dir):
    """kind -> model folder, built on first use."""
    root = tmp_path_factory.mktemp("tiny_models")
    built: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in built:
            built[kind] = build_tiny_model(root / kind, demo_model_dir, kind)
        return built[kind]

    return get


@pytest.fixture(scope="session")
def tiny_exports(tmp_path_factory, tiny_models):
    """(kind, exporter) -> (export folder, manifest), exported and validated on first use."""
    root = tmp_path_factory.mktemp("tiny_exports")
    done: dict[tuple[str, str], tuple] = {}

    def get(kind: str, exporter: str = "torchscript"):
        if (kind, exporter) not in done:
            out = root / f"{kind}-{exporter}"
            options = ExportOptions(model_dir=tiny_models(kind), out_dir=out, block_size=BLOCK_SIZE, exporter=exporter)
            done[(kind, exporter)] = (out, export_onnx(options))
        return done[(kind, exporter)]

    return get

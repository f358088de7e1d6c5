"""A local Hugging Face model folder, checked before anything is loaded from it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from lepton.errors import ModelFolderError

# NOTE: architectures whose layers are the Llama block (RMSNorm, RoPE, GQA, SwiGLU); Qwen2 adds
# q/k/v biases, Mistral a sliding window we only accept when it covers the whole context.
SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")
PICKLE_WEIGHT_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth")


@dataclass(frozen=True)
class ModelFolder:
    """Paths and parsed config of a servable model folder."""

    path: Path
    config: dict
    weight_files: tuple[Path, ...]
    tokenizer_file: Path

    @property
    def model_type(self) -> str:
        return self.config["model_type"]

    @classmethod
    def open(cls, path: str | Path) -> "ModelFolder":
        """Validate a folder: config.json of a supported family, safetensors weights, tokenizer.json."""
        path = Path(path).expanduser().resolve()
        if not path.is_dir():
            raise ModelFolderError(f"model folder {path} does not exist or is not a directory")
        config_file = path / "config.json"
        if not config_file.is_file():
            raise ModelFolderError(f"{path}: no config.json; expected a Hugging Face model folder")
        try:
            config = json.loads(config_file.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ModelFolderError(f"{config_file}: not valid JSON ({exc})") from None
        model_type = config.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ModelFolderError(
                f"{path}: model_type {model_type!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        weights = tuple(sorted(path.glob("*.safetensors")))
        if not weights:
            pickles = [name for name in PICKLE_WEIGHT_FILES if (path / name).exists()]
            hint = f" (found {', '.join(pickles)}: pickled checkpoints are never loaded)" if pickles else ""
            raise ModelFolderError(f"{path}: no *.safetensors weights{hint}")
        tokenizer_file = path / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise ModelFolderError(f"{path}: no tokenizer.json (a fast tokenizer is required)")
        return cls(path=path, config=config, weight_files=weights, tokenizer_file=tokenizer_file)

    def read_json(self, name: str) -> dict:
        """An optional JSON file of the folder, or {} when absent."""
        file = self.path / name
        if not file.is_file():
            return {}
        try:
            return json.loads(file.read_text())
        except json.JSONDecodeError as exc:
            raise ModelFolderError(f"{file}: not valid JSON ({exc})") from None

"""manifest.json of an export folder: what the graph is, where it came from, how well it matched."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
import types
import typing
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from lepton.errors import ModelFolderError
from lepton.models.llama import ModelConfig

EXPORTER = "lepton-export"
# NOTE: bump when a field changes meaning or a reader could misread an older file; runners refuse
# any other version rather than guess.
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
TOOLS = ("torch", "onnx", "onnxruntime", "transformers")


class ManifestError(ModelFolderError):
    """manifest.json is missing, malformed, or from an incompatible exporter format version."""


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output; a str in shape is a dynamic axis named in Manifest.dynamic_axes."""

    name: str
    dtype: str  # numpy dtype name: "int64", "float32"
    shape: tuple[int | str, ...]


@dataclass(frozen=True)
class SourceModel:
    """The model folder the graph was exported from, identified by content hashes."""

    path: str  # as given at export time; informational only
    model_type: str
    config_sha256: str  # of config.json
    weights_sha256: dict[str, str]  # safetensors file name -> sha256


@dataclass(frozen=True)
class CheckResult:
    """One validation check: errors of the exported graph against the PyTorch step model."""

    name: str
    num_steps: int
    max_logit_error: float  # max |onnx - torch| over all sampled logits of all steps
    max_kv_error: float  # max |onnx - torch| over the K/V written into the pools
    argmax_equal: bool  # every step's argmax agrees (or is a tie within logits_atol)
    logits_atol: float
    kv_atol: float
    passed: bool


@dataclass(frozen=True)
class QuantizationRecipe:
    """How a quantized export was made from its float32 export (see export/quantization.py presets)."""

    preset: str  # the named preset the recipe started from, e.g. "int4-block32-sym-acc4"
    method: str  # "int8": int8 weights, activations quantized per step; "int4": 4-bit weight-only
    weight_type: str  # stored weight type: "int8", "uint8" or "int4"
    per_channel: bool  # one scale per output channel (int8)
    block_size: int | None  # weights per scale along K (int4 blocks); None when per channel
    symmetric: bool  # no zero points
    accuracy_level: int | None  # MatMulNBits compute type (1 fp32, 4 int8); None for int8
    reduce_range: bool  # 7-bit int8 weights (avoids u8s8 saturation on CPUs without VNNI)
    op_types: tuple[str, ...]  # ONNX op types whose constant weights were quantized
    num_quantized: int  # weight matrices quantized
    tool: str  # "onnxruntime 1.32.0"
    source_graph_sha256: str  # of the float32 model.onnx the recipe was applied to


@dataclass(frozen=True)
class Manifest:
    """Everything a runner or build step needs to know about model.onnx; nothing is guessed twice."""

    exporter: str  # always EXPORTER
    format_version: int
    backend: str  # the torch.onnx exporter used: "torchscript" or "dynamo"
    opset: int
    model_file: str  # the graph, relative to the export folder
    external_data: str | None  # weights file next to model_file (only for graphs over 2 GB)
    block_size: int  # tokens per KV block; the pools' second axis
    kv_dtype: str  # dtype of the K/V pools
    model_config: ModelConfig
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    dynamic_axes: dict[str, str]  # axis name -> meaning
    source: SourceModel
    tools: dict[str, str]  # package -> version at export time, plus python
    # NOTE: typed since quantized exports exist; every earlier manifest wrote null here, so
    # FORMAT_VERSION 1 files still load unchanged.
    quantization: QuantizationRecipe | None = None  # None for a float32 export
    validation: tuple[CheckResult, ...] = field(default_factory=tuple)

    def save(self, path: Path) -> None:
        """Write as indented JSON."""
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> "Manifest":
        """Read and check a manifest; a different format version is an error naming both."""
        if not path.is_file():
            raise ManifestError(f"{path}: no manifest.json; expected a folder written by `python -m export onnx`")
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ManifestError(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(data, dict) or data.get("exporter") != EXPORTER:
            found = data.get("exporter") if isinstance(data, dict) else None
            raise ManifestError(f"{path}: exporter is {found!r}, expected {EXPORTER!r}")
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise ManifestError(
                f"{path}: manifest format version {version!r} is not supported by this build, which "
                f"reads {EXPORTER} format version {FORMAT_VERSION}; re-export the model"
            )
        return _build(cls, data, str(path))

    def input_names(self) -> list[str]:
        return [spec.name for spec in self.inputs]


def tool_versions() -> dict[str, str]:
    """Versions of the packages that shaped the graph."""
    versions = {"python": platform.python_version()}
    for name in TOOLS:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _build(cls, data: Any, where: str):
    """Build dataclass cls from a JSON object: unknown or missing keys and wrong types are errors."""
    if not isinstance(data, dict):
        raise ManifestError(f"{where}: expected an object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(data.keys() - fields.keys())
    required = {n for n, f in fields.items() if f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING}
    missing = sorted(required - data.keys())
    if unknown or missing:
        raise ManifestError(f"{where}: unknown keys {unknown}, missing keys {missing}")
    return cls(**{name: _value(hints[name], value, f"{where}.{name}") for name, value in data.items()})


def _value(kind: Any, value: Any, where: str) -> Any:
    """Convert one JSON value to the annotated type, or raise ManifestError."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if dataclasses.is_dataclass(kind):
        return _build(kind, value, where)
    if origin in (typing.Union, types.UnionType):
        if value is not None and len(args) == 2 and type(None) in args:
            # NOTE: an optional field that is set: report the real type's error, not "none of".
            return _value(next(a for a in args if a is not type(None)), value, where)
        for option in args:
            try:
                return _value(option, value, where)
            except ManifestError:
                continue
        raise ManifestError(f"{where}: {value!r} is none of {kind}")
    if origin is tuple:
        if not isinstance(value, list):
            raise ManifestError(f"{where}: expected a list, got {value!r}")
        item = args[0]
        return tuple(_value(item, v, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict or kind is Any:
        if origin is dict and not isinstance(value, dict):
            raise ManifestError(f"{where}: expected an object, got {value!r}")
        return value
    if kind is type(None):
        if value is not None:
            raise ManifestError(f"{where}: expected null, got {value!r}")
        return None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ManifestError(f"{where}: expected {kind.__name__}, got {value!r}")
    return value

"""Runs a TensorRT plan built by `python -m export tensorrt`; owns the K/V pools on the GPU.

NOTE: the runner needs a CUDA GPU and has not been run on one yet (the machines it was written on have
no GPU); the plan build path it pairs with is tested on the CPU with TensorRT-RTX.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lepton.batch import ModelInput
from lepton.config import EngineConfig
from lepton.errors import ConfigError, ModelFolderError
from lepton.manifest import MANIFEST_FILE, Manifest
from lepton.model_folder import ModelFolder

ENGINE_MANIFEST_FILE = "trt_manifest.json"
ENGINE_FORMAT_VERSION = 1
PLAN_FILE = "model.plan"
OUTPUTS = ("logits", "new_k", "new_v")
# NOTE: the ONNX parser warns once per int64 input; int64 is the graph's contract, bound as such below.
_QUIET = re.compile(r"Make sure input \S+ has Int64 binding")
log = logging.getLogger("lepton.tensorrt")


class TensorRTUnavailable(RuntimeError):
    """This host cannot build or run TensorRT plans: no TensorRT module, or (to run) no CUDA GPU."""


@dataclass(frozen=True)
class TensorRTLibrary:
    """The TensorRT Python module found on this host and which flavour it is."""

    module: Any  # `tensorrt` or `tensorrt_rtx_bindings`; same API apart from the differences handled by callers
    flavour: str  # "tensorrt" (GPU hosts, NGC images) or "tensorrt-rtx" (PyPI wheels, builds without a GPU)
    version: str
    logger: Any  # the process-wide ILogger; keeps the errors of the current build or load

    def take_errors(self) -> list[str]:
        """Errors TensorRT logged since the last call."""
        errors, self.logger.errors[:] = list(self.logger.errors), []
        return errors


@functools.cache
def load_tensorrt() -> TensorRTLibrary:
    """Import real TensorRT if present, else TensorRT-RTX; one logger for the process (TensorRT keeps the first)."""
    try:
        import tensorrt as trt

        flavour = "tensorrt"
    except (ImportError, OSError):
        try:
            import tensorrt_rtx_libs  # noqa: F401  (loads the shared libraries the bindings link against)
            import tensorrt_rtx_bindings as trt
        except (ImportError, OSError) as exc:
            raise TensorRTUnavailable(
                "neither `tensorrt` (NGC images) nor `tensorrt_rtx_bindings` (pip install "
                f"tensorrt-rtx-cu12-libs tensorrt-rtx-cu12-bindings) can be imported: {exc}"
            ) from None
        flavour = "tensorrt-rtx"
    return TensorRTLibrary(trt, flavour, trt.__version__, _collecting_logger(trt))


def _collecting_logger(trt: Any) -> Any:
    class CollectingLogger(trt.ILogger):
        """Forwards TensorRT's messages to logging and keeps its errors for the exception that follows."""

        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg: str) -> None:
            if severity in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR):
                self.errors.append(msg)
                log.debug("%s", msg)  # NOTE: raised with the error that follows, so not logged twice
            elif severity == trt.ILogger.Severity.WARNING and not _QUIET.search(msg):
                log.warning("%s", msg)
            else:
                log.debug("%s", msg)

    return CollectingLogger()


@dataclass(frozen=True)
class AxisRange:
    """An optimization profile's bounds for one dynamic axis."""

    min: int
    opt: int  # the shape TensorRT tunes kernels for
    max: int


@dataclass(frozen=True)
class EngineManifest:
    """trt_manifest.json: how the plan next to it was built; manifest.json beside it describes the graph."""

    format_version: int
    flavour: str  # "tensorrt" or "tensorrt-rtx": plans of one do not load in the other
    tensorrt_version: str  # plans load only in the same version
    precision: str  # "fp32", "fp16", "bf16" (linear layers), "int8", "fp8" (linear layers, Q/DQ)
    plan_file: str
    plan_bytes: int
    profiles: tuple[dict[str, AxisRange], ...]  # one per optimization profile: dynamic axis -> range
    compute_capabilities: tuple[str, ...]  # TensorRT-RTX targets, e.g. "SM89"; () = the library's default
    tf32: bool  # whether fp32 matrix products may use TF32
    num_linear_layers: int  # linear layers given the precision (0 for fp32)
    calibration: dict[str, Any] | None  # int8/fp8: how activation scales were measured
    source_export: str  # the export folder, as given
    source_manifest_sha256: str
    graph_seconds: float  # typing the graph (and int8/fp8 calibration); 0 for fp32
    build_seconds: float  # TensorRT parse and build

    def save(self, path: Path) -> None:
        """Write as indented JSON."""
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> "EngineManifest":
        """Read trt_manifest.json; another format version, missing or unknown keys are an error naming the file."""
        try:
            data = json.loads(path.read_text())
            if data.get("format_version") != ENGINE_FORMAT_VERSION:
                raise ValueError(f"format_version {data.get('format_version')!r} is not {ENGINE_FORMAT_VERSION}")
            data["profiles"] = tuple({axis: AxisRange(**bounds) for axis, bounds in profile.items()}
                                     for profile in data["profiles"])
            data["compute_capabilities"] = tuple(data["compute_capabilities"])
            return cls(**data)
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
            raise ModelFolderError(f"{path}: not a TensorRT engine manifest ({exc}); build it with "
                                   "`python -m export tensorrt`") from None


def open_engine_folder(path: str | Path) -> ModelFolder:
    """Check an engine folder (manifests, plan, config, tokenizer) and describe it as a ModelFolder."""
    path = Path(path).expanduser().resolve()
    Manifest.load(path / MANIFEST_FILE)
    engine = EngineManifest.load(path / ENGINE_MANIFEST_FILE)
    for name in (engine.plan_file, "config.json", "tokenizer.json"):
        if not (path / name).is_file():
            raise ModelFolderError(f"{path}: engine folder has no {name}; build it again")
    config = json.loads((path / "config.json").read_text())
    return ModelFolder(path=path, config=config, weight_files=(), tokenizer_file=path / "tokenizer.json")


def require_runtime(engine: EngineManifest) -> TensorRTLibrary:
    """The CUDA device and the TensorRT flavour/version the plan was built for, or a clear error."""
    if not torch.cuda.is_available():
        raise TensorRTUnavailable(f"the tensorrt runner needs a CUDA GPU; torch {torch.__version__} sees none "
                                  "on this host (use runner=onnxruntime on CPU hosts)")
    library = load_tensorrt()
    if (library.flavour, library.version) != (engine.flavour, engine.tensorrt_version):
        raise ModelFolderError(
            f"the plan was built with {engine.flavour} {engine.tensorrt_version}; this host has {library.flavour} "
            f"{library.version}, which cannot load it; rebuild it here with `python -m export tensorrt`"
        )
    return library


class TensorRTRunner:
    """A deserialized TensorRT plan plus per-layer K and V pools [num_blocks, block_size, KVH, D] on the GPU."""

    def __init__(self, folder: ModelFolder | str | Path, config: EngineConfig) -> None:
        path = folder.path if isinstance(folder, ModelFolder) else Path(folder)
        self.manifest = Manifest.load(path / MANIFEST_FILE)
        self.engine_manifest = EngineManifest.load(path / ENGINE_MANIFEST_FILE)
        self.model_config = self.manifest.model_config
        self.block_size = self.manifest.block_size
        # NOTE: the int64 inputs are the step's indices, fields of ModelInput by the same names; the rest are pools.
        self.index_inputs = tuple(spec.name for spec in self.manifest.inputs if spec.dtype == "int64")
        library = require_runtime(self.engine_manifest)
        # NOTE: the current device is per thread: set here for the load, and around every step (the
        # engine thread's own current device is GPU 0).
        if config.runner.device_id >= torch.cuda.device_count():
            raise ConfigError(f"device_id: GPU {config.runner.device_id} does not exist; this host has "
                              f"{torch.cuda.device_count()}")
        self.device = torch.device("cuda", config.runner.device_id)
        torch.cuda.set_device(self.device)
        if config.cache.block_size != self.block_size:
            raise ConfigError(f"block_size: {path} was exported with block_size {self.block_size}, the engine is "
                              f"configured with {config.cache.block_size}; set block_size={self.block_size}")
        if config.runner.dtype != self.manifest.kv_dtype:
            raise ConfigError(f"dtype: {path} keeps its K/V pools in {self.manifest.kv_dtype}; the engine asks for "
                              f"{config.runner.dtype}; set dtype={self.manifest.kv_dtype}")
        self.num_blocks = pool_blocks(self.manifest, config.cache.kv_cache_memory_bytes)
        _check_limits(self.engine_manifest.profiles[0], config, self.num_blocks, self.block_size)
        runtime = library.module.Runtime(library.logger)
        self.engine = runtime.deserialize_cuda_engine((path / self.engine_manifest.plan_file).read_bytes())
        if self.engine is None:
            raise ModelFolderError(f"{path}: TensorRT could not load the plan: {library.take_errors()}")
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream()
        cfg, dtype = self.model_config, getattr(torch, self.manifest.kv_dtype)
        shape = (self.num_blocks, self.block_size, cfg.num_kv_heads, cfg.head_dim)
        # NOTE: zero-filled so masked slots never hold NaN; allocated once, bound by address once.
        self.k_pools = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(cfg.num_layers)]
        self.v_pools = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(cfg.num_layers)]
        for layer, (k_pool, v_pool) in enumerate(zip(self.k_pools, self.v_pools)):
            for name, pool in ((f"k_pool_{layer}", k_pool), (f"v_pool_{layer}", v_pool)):
                self._bind(name, pool)
        torch.cuda.synchronize()  # NOTE: the pools were zeroed on the default stream; steps run on self.stream

    def execute(self, batch: ModelInput) -> torch.Tensor:
        """Compute one step, write its K/V into the pools, return float32 logits [L, vocab] on the CPU."""
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            # NOTE: every tensor below lives on self.stream, so copies, the plan and the pool writes are ordered.
            inputs = {name: _on_device(np.asarray(getattr(batch, name), np.int64)) for name in self.index_inputs}
            for name, tensor in inputs.items():
                self._bind(name, tensor)
            outputs = {name: _device_buffer(tuple(self.context.get_tensor_shape(name)), torch.float32)
                       for name in OUTPUTS}
            for name, tensor in outputs.items():
                self.context.set_tensor_address(name, tensor.data_ptr())
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise RuntimeError(f"TensorRT failed to run the step: {load_tensorrt().take_errors()}")
            slots = _on_device(np.asarray(batch.slot_mapping, np.int64))
            for layer, (k_pool, v_pool) in enumerate(zip(self.k_pools, self.v_pools)):
                k_pool.view(-1, *k_pool.shape[2:]).index_copy_(0, slots, outputs["new_k"][layer].to(k_pool.dtype))
                v_pool.view(-1, *v_pool.shape[2:]).index_copy_(0, slots, outputs["new_v"][layer].to(v_pool.dtype))
            return outputs["logits"].cpu()  # NOTE: a blocking copy, so the step is complete on return

    def _bind(self, name: str, tensor: torch.Tensor) -> None:
        if not self.context.set_input_shape(name, tuple(tensor.shape)):
            raise ValueError(f"input {name} of shape {tuple(tensor.shape)} is outside the plan's profile "
                             f"{self.engine_manifest.profiles[0]}")
        self.context.set_tensor_address(name, tensor.data_ptr())


def _device_buffer(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialized CUDA tensor whose address is never null, even when it is empty (L = 0)."""
    # NOTE: torch gives empty tensors a null address, which TensorRT may refuse as unbound.
    size = math.prod(shape)
    return torch.empty(max(size, 1), dtype=dtype, device="cuda")[:size].view(shape)


def _on_device(array: np.ndarray) -> torch.Tensor:
    """array copied to the GPU on the current stream."""
    source = torch.from_numpy(np.ascontiguousarray(array))
    return _device_buffer(tuple(source.shape), source.dtype).copy_(source)


def pool_blocks(manifest: Manifest, memory_bytes: int) -> int:
    """KV blocks that fit memory_bytes, K and V of all layers together (as the other runners)."""
    cfg = manifest.model_config
    bytes_per_block = 2 * cfg.num_layers * manifest.block_size * cfg.num_kv_heads * cfg.head_dim
    bytes_per_block *= np.dtype(manifest.kv_dtype).itemsize
    if memory_bytes < bytes_per_block:
        raise ConfigError(f"kv_cache_memory_bytes: {memory_bytes} bytes hold no KV block of {bytes_per_block} "
                          "bytes; raise it")
    return memory_bytes // bytes_per_block


def _check_limits(profile: dict[str, AxisRange], config: EngineConfig, num_blocks: int, block_size: int) -> None:
    """The engine's limits must fit the plan's profile; each misfit names the build flag that widens it."""
    wanted = {
        "T": (config.scheduler.max_num_batched_tokens, "--max-tokens"),
        "S": (config.scheduler.max_num_seqs, "--max-seqs"),
        "num_blocks": (num_blocks, "--max-pool-blocks"),
    }
    if config.max_model_len:
        wanted["B"] = (-(-config.max_model_len // block_size), "--max-blocks-per-seq")
    for axis, (value, flag) in wanted.items():
        if axis in profile and value > profile[axis].max:
            raise ConfigError(f"the plan's profile allows {axis} <= {profile[axis].max}, the engine needs {value}; "
                              f"rebuild with `python -m export tensorrt {flag} {value}` or lower the engine limit")

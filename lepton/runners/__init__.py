"""Model runners: one per execution backend, chosen by config.runner.runner."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch

from lepton.batch import ModelInput
from lepton.config import EngineConfig
from lepton.errors import ConfigError
from lepton.model_folder import ModelFolder
from lepton.models.llama import ModelConfig


class Runner(Protocol):
    """What the engine needs of a runner: pool geometry, model numbers, one step."""

    num_blocks: int
    block_size: int
    model_config: ModelConfig

    def execute(self, batch: ModelInput) -> torch.Tensor: ...

    # NOTE: optional, set by a caller that reads a step's logits before it runs the next step (LLMEngine):
    # transient_logits = True lets a runner return them in memory of its own that the next step overwrites.


def _torch_folder(path: Path) -> ModelFolder:
    return ModelFolder.open(path)


def _onnx_folder(path: Path) -> ModelFolder:
    from lepton.runners.onnx_runner import open_export_folder

    return open_export_folder(path)


def _tensorrt_folder(path: Path) -> ModelFolder:
    from lepton.runners.tensorrt_runner import open_engine_folder

    return open_engine_folder(path)


def _torch_runner(folder: ModelFolder, config: EngineConfig) -> Runner:
    from lepton.runners.torch_runner import TorchRunner

    return TorchRunner(folder, config)


def _onnx_runner(folder: ModelFolder, config: EngineConfig) -> Runner:
    from lepton.runners.onnx_runner import OnnxRunner
    from lepton.runners.slot_graph import SlotGraphError

    attention = config.runner.attention
    if config.runner.deterministic:  # NOTE: batch invariance was measured on the paged graph only
        if attention == "slots":
            raise ConfigError("attention: slots is not batch-invariant as measured; deterministic=true serves "
                              "attention=paged (or auto)")
        attention = "paged"
    # NOTE: auto serves slots: in alternating served pairs (docs/performance.md) they made 1.4x the
    # 16-stream throughput of the paged graph, with lower single-stream latency and time to first token.
    if attention != "paged":
        from lepton.runners.slot_runner import SlotRunner

        try:
            return SlotRunner(folder, config)
        except SlotGraphError as error:
            if attention == "slots" or config.runner.kv_cache_dtype == "float16":
                what = "attention: slots" if attention == "slots" else "kv_cache_dtype: float16 (attention=slots)"
                raise ConfigError(f"{what} cannot serve {folder.path}: {error}") from None
            print(f"[lepton] attention=auto: {error}; serving the paged graph", flush=True)
    return OnnxRunner(folder, config)


def _tensorrt_runner(folder: ModelFolder, config: EngineConfig) -> Runner:
    from lepton.runners.tensorrt_runner import TensorRTRunner

    return TensorRTRunner(folder, config)


# NOTE: imports are deferred so that serving with torch never imports onnxruntime or TensorRT, and vice versa.
FOLDER_OPENERS = {"torch": _torch_folder, "onnxruntime": _onnx_folder, "tensorrt": _tensorrt_folder}
RUNNER_FACTORIES = {"torch": _torch_runner, "onnxruntime": _onnx_runner, "tensorrt": _tensorrt_runner}


def open_folder(config: EngineConfig) -> ModelFolder:
    """The folder the configured runner serves: HF (torch), export (onnxruntime) or engine (tensorrt)."""
    return FOLDER_OPENERS[_checked(config)](Path(config.model_dir))


def make_runner(folder: ModelFolder, config: EngineConfig) -> Runner:
    """Build the runner named by config.runner.runner over folder."""
    return RUNNER_FACTORIES[_checked(config)](folder, config)


def _checked(config: EngineConfig) -> str:
    name = config.runner.runner
    if name not in RUNNER_FACTORIES:
        raise ConfigError(f"runner: must be one of {', '.join(RUNNER_FACTORIES)}, got {name!r}")
    return name

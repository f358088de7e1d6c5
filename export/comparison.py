"""Graph-level comparison with polygraphy's Comparator (PyTorch vs ONNX, or one ONNX graph vs another)."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from polygraphy.backend.base import BaseRunner
from polygraphy.backend.onnxrt import OnnxrtRunner
from polygraphy.common import TensorMetadata
from polygraphy.comparator import Comparator, SimpleCompareFunc
from polygraphy.logger import G_LOGGER

from lepton.manifest import TensorSpec
from lepton.models.llama import PagedCausalLM
from lepton.runners.onnx_runner import INDEX_INPUTS, make_session


@dataclass(frozen=True)
class GraphComparison:
    """Outcome of comparing the first runner (reference) with the second over all feeds."""

    max_abs_error: dict[str, float]  # output name -> max |difference| over all iterations
    argmax_equal: bool  # argmax of "logits" agrees on every row (ties within the logits atol allowed)
    passed: bool  # polygraphy's per-output verdict within atol, and argmax_equal


class TorchStepRunner(BaseRunner):
    """A polygraphy runner for PagedCausalLM, fed by the ONNX graph's named inputs (CPU)."""

    def __init__(self, model: PagedCausalLM, inputs: tuple[TensorSpec, ...], name: str | None = None) -> None:
        super().__init__(name=name, prefix="pytorch-step-runner")
        self.model, self.inputs = model, inputs

    def activate_impl(self) -> None:
        self.model.eval()

    def deactivate_impl(self) -> None:
        pass

    def get_input_metadata_impl(self) -> TensorMetadata:
        meta = TensorMetadata()
        for spec in self.inputs:
            meta.add(spec.name, dtype=np.dtype(spec.dtype), shape=list(spec.shape))
        return meta

    @torch.inference_mode()
    def infer_impl(self, feed_dict):
        tensors = {name: torch.from_numpy(np.asarray(value)) for name, value in feed_dict.items()}
        num_layers = self.model.cfg.num_layers
        k_pools = [tensors[f"k_pool_{i}"] for i in range(num_layers)]
        v_pools = [tensors[f"v_pool_{i}"] for i in range(num_layers)]
        outputs = self.model(*(tensors[name] for name in INDEX_INPUTS), k_pools, v_pools)
        self.inference_time = 0.0
        return OrderedDict((name, out.float().numpy()) for name, out in zip(("logits", "new_k", "new_v"), outputs))


def onnxrt_runner(model_file: Path, num_threads: int = 0, name: str | None = None) -> OnnxrtRunner:
    """A polygraphy ONNX Runtime runner with the serving runner's session options."""
    return OnnxrtRunner(lambda: make_session(model_file, num_threads), name=name)


def compare_graphs(runners: list[BaseRunner], feeds: list[dict[str, np.ndarray]],
                   atol: dict[str, float]) -> GraphComparison:
    """Run polygraphy's Comparator on feeds and compare runners[0] (reference) with runners[1]."""
    if len(runners) != 2:
        raise ValueError(f"compare_graphs compares exactly two runners, got {len(runners)}")
    with G_LOGGER.verbosity(G_LOGGER.ERROR):
        results = Comparator.run(runners, data_loader=feeds)
        accuracy = Comparator.compare_accuracy(results, compare_func=SimpleCompareFunc(atol=atol, rtol=0.0))
    errors = {name: 0.0 for name in atol}
    for per_iteration in accuracy[0].values():
        for outputs in per_iteration:
            for name, compared in outputs.items():
                errors[name] = max(errors.get(name, 0.0), float(compared.max_absdiff))
    (_, reference), (_, candidate) = results[0], results[1]
    argmax_equal = all(
        argmax_agrees(ref["logits"], got["logits"], atol.get("logits", 0.0))
        for ref, got in zip(reference, candidate)
    )
    return GraphComparison(errors, argmax_equal, bool(accuracy) and argmax_equal)


def argmax_agrees(reference: np.ndarray, candidate: np.ndarray, atol: float) -> bool:
    """Each row's argmax is equal, or the candidate's pick is within atol of the reference's best."""
    if reference.shape[0] == 0:
        return True
    chosen = reference[np.arange(reference.shape[0]), candidate.argmax(axis=1)]
    return bool(np.all(chosen >= reference.max(axis=1) - atol))

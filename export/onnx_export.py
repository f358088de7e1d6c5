"""Export PagedCausalLM as one ONNX step graph over a paged KV cache, into a servable folder."""

from __future__ import annotations

import dataclasses
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from lepton.manifest import (
    EXPORTER, FORMAT_VERSION, MANIFEST_FILE, Manifest, SourceModel, TensorSpec, sha256_file, tool_versions,
)
from export.validation import require_passed, validate_export
from lepton.model_folder import ModelFolder
from lepton.models.llama import ModelConfig, PagedCausalLM
from lepton.models.loader import load_model
from lepton.runners.onnx_runner import INDEX_INPUTS

EXPORTERS = ("torchscript", "dynamo")  # see EXPORT_FUNCTIONS
DEFAULT_OPSET = 18
MODEL_FILE = "model.onnx"
EXTERNAL_DATA_FILE = "model.onnx.data"
# NOTE: protobuf cannot serialize a message over 2 GiB; keep a margin for the graph itself.
MAX_INLINE_BYTES = (2 << 30) - (64 << 20)
COPIED_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "chat_template.jinja")
DYNAMIC_AXES = {
    "T": "tokens computed this step",
    "S": "sequences scheduled this step",
    "Q": "most tokens of one sequence this step",
    "B": "longest block table",
    "L": "rows of logits (sequences sampled this step)",
    "num_blocks": "blocks in each K/V pool",
}
INDEX_SHAPES = {"input_ids": ("T",), "positions": ("T",), "token_index": ("S", "Q"), "token_slot": ("T",),
                "query_lens": ("S",), "context_lens": ("S",), "block_tables": ("S", "B"), "logits_indices": ("L",)}
# NOTE: the only ops allowed to read a pool: gathers along axis 0 (whole blocks, or key rows of a
# [-1, head_dim] view of it).
POOL_READERS = {"Gather": ("axis", 0), "GatherND": ("batch_dims", 0)}


class ExportError(RuntimeError):
    """The exported graph is not the step graph the runners expect."""


@dataclass(frozen=True)
class ExportOptions:
    """What `python -m export onnx` was asked to do."""

    model_dir: Path
    out_dir: Path
    block_size: int = 16
    opset: int = DEFAULT_OPSET
    exporter: str = "dynamo"  # smaller, slightly faster graph; "torchscript" exports ~4x faster
    validate: bool = True


def graph_io(cfg: ModelConfig, block_size: int) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """The step graph's declared inputs and outputs (names, dtypes, dynamic axes)."""
    pool_shape = ("num_blocks", block_size, cfg.num_kv_heads, cfg.head_dim)
    inputs = [TensorSpec(name, "int64", INDEX_SHAPES[name]) for name in INDEX_INPUTS]
    for layer in range(cfg.num_layers):
        inputs += [TensorSpec(f"{kv}_pool_{layer}", "float32", pool_shape) for kv in "kv"]
    kv_shape = (cfg.num_layers, "T", cfg.num_kv_heads, cfg.head_dim)
    outputs = (TensorSpec("logits", "float32", ("L", cfg.vocab_size)),
               TensorSpec("new_k", "float32", kv_shape), TensorSpec("new_v", "float32", kv_shape))
    return tuple(inputs), outputs


class StepGraph(nn.Module):
    """PagedCausalLM with flat tensor arguments: index inputs, then k_pool_0, v_pool_0, k_pool_1, ..."""

    def __init__(self, model: PagedCausalLM) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, positions, token_index, token_slot, query_lens, context_lens,
                block_tables, logits_indices, *pools):
        return self.model(input_ids, positions, token_index, token_slot, query_lens, context_lens,
                          block_tables, logits_indices, list(pools[0::2]), list(pools[1::2]))


def example_inputs(cfg: ModelConfig, block_size: int) -> tuple[torch.Tensor, ...]:
    """A valid two-sequence step whose dynamic sizes are distinct and > 1 (nothing specializes)."""
    # NOTE: S=2, Q=3, T=5, B=3, L=2, num_blocks=4: sequence 0 decodes 3 tokens after 16 cached,
    # sequence 1 prefills 2 tokens.
    index = {
        "input_ids": [5, 6, 7, 8, 9], "positions": [16, 17, 18, 0, 1], "token_index": [[0, 1, 2], [3, 4, 4]],
        "token_slot": [0, 1, 2, 3, 4], "query_lens": [3, 2], "context_lens": [19, 2],
        "block_tables": [[1, 2, 0], [3, 0, 0]], "logits_indices": [2, 4],
    }
    tensors = [torch.tensor(index[name], dtype=torch.int64) for name in INDEX_INPUTS]
    pool_shape = (4, block_size, cfg.num_kv_heads, cfg.head_dim)
    generator = torch.Generator().manual_seed(0)
    pools = [torch.randn(pool_shape, generator=generator) for _ in range(2 * cfg.num_layers)]
    return tuple(tensors + pools)


def export_graph(model: PagedCausalLM, specs: tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]],
                 exporter: str, opset: int, path: Path) -> None:
    """Run torch.onnx.export with the chosen exporter into path (weights may land next to it)."""
    module = StepGraph(model).eval()
    with torch.no_grad(), warnings.catch_warnings():
        EXPORT_FUNCTIONS[exporter](module, example_inputs(model.cfg, model.block_size), specs, opset, path)


def _export_torchscript(module: StepGraph, args: tuple, specs, opset: int, path: Path) -> None:
    inputs, outputs = specs
    axes = {s.name: {i: a for i, a in enumerate(s.shape) if isinstance(a, str)} for s in inputs + outputs}
    # NOTE: the TorchScript exporter is deprecated; it stays because it exports several times faster.
    warnings.simplefilter("ignore", DeprecationWarning)
    torch.onnx.export(module, args, str(path), input_names=[s.name for s in inputs],
                      output_names=[s.name for s in outputs], dynamic_axes=axes, opset_version=opset,
                      dynamo=False, do_constant_folding=True)


def _export_dynamo(module: StepGraph, args: tuple, specs, opset: int, path: Path) -> None:
    inputs, outputs = specs
    dims = {axis: torch.export.Dim(axis) for axis in DYNAMIC_AXES}
    shapes = [{i: dims[a] for i, a in enumerate(s.shape) if isinstance(a, str)} for s in inputs]
    # NOTE: StepGraph takes the pools as *pools, so their shapes form one trailing tuple.
    dynamic = tuple(shapes[: len(INDEX_INPUTS)]) + (tuple(shapes[len(INDEX_INPUTS):]),)
    # NOTE: one named Dim shared by several inputs is the intent, not a conflict; LeafSpec is torch's own.
    warnings.filterwarnings("ignore", message=".*shares the same shape constraints")
    warnings.filterwarnings("ignore", category=FutureWarning, message=".*LeafSpec")
    program = torch.onnx.export(module, args, input_names=[s.name for s in inputs],
                                output_names=[s.name for s in outputs], dynamic_shapes=dynamic,
                                opset_version=opset, dynamo=True, verbose=False, optimize=True)
    program.save(str(path))


EXPORT_FUNCTIONS = {"torchscript": _export_torchscript, "dynamo": _export_dynamo}


def finish_graph(raw: Path, out: Path, inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...]) -> str | None:
    """Name the graph's axes as declared, check how pools are read, save; returns the external data file."""
    model = onnx.load(str(raw))
    _apply_specs(model.graph.input, inputs)
    _apply_specs(model.graph.output, outputs)
    check_pool_reads(model.graph, [s.name for s in inputs if s.name not in INDEX_INPUTS])
    external = EXTERNAL_DATA_FILE if _initializer_bytes(model) > MAX_INLINE_BYTES else None
    onnx.save_model(model, str(out), save_as_external_data=external is not None,
                    all_tensors_to_one_file=True, location=external, size_threshold=1024)
    onnx.checker.check_model(str(out))
    return external


def export_onnx(options: ExportOptions) -> Manifest:
    """Export, copy the serving files, validate against PyTorch; the folder appears only if all passed."""
    if options.exporter not in EXPORTERS:
        raise ExportError(f"exporter must be one of {', '.join(EXPORTERS)}, got {options.exporter!r}")
    if options.block_size < 1:
        raise ExportError(f"block_size must be >= 1, got {options.block_size}")
    folder = ModelFolder.open(options.model_dir)
    model = load_model(folder, torch.float32, options.block_size)
    staging = options.out_dir.with_name(options.out_dir.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "raw").mkdir(parents=True)
    specs = graph_io(model.cfg, options.block_size)
    export_graph(model, specs, options.exporter, options.opset, staging / "raw" / MODEL_FILE)
    external = finish_graph(staging / "raw" / MODEL_FILE, staging / MODEL_FILE, *specs)
    shutil.rmtree(staging / "raw")
    del model
    for name in COPIED_FILES:
        if (folder.path / name).is_file():
            shutil.copy2(folder.path / name, staging / name)
    manifest = Manifest(
        exporter=EXPORTER, format_version=FORMAT_VERSION, backend=options.exporter, opset=options.opset,
        model_file=MODEL_FILE, external_data=external, block_size=options.block_size, kv_dtype="float32",
        model_config=ModelConfig.from_hf(folder.config), inputs=specs[0], outputs=specs[1],
        dynamic_axes=dict(DYNAMIC_AXES), source=source_model(folder), tools=tool_versions(),
    )
    manifest.save(staging / MANIFEST_FILE)
    if options.validate:
        results = validate_export(folder, staging, options.block_size)
        manifest = dataclasses.replace(manifest, validation=results)
        manifest.save(staging / MANIFEST_FILE)
        require_passed(results, staging)
    shutil.rmtree(options.out_dir, ignore_errors=True)
    staging.rename(options.out_dir)
    return manifest


def source_model(folder: ModelFolder) -> SourceModel:
    """Content hashes of the source config.json and safetensors files."""
    return SourceModel(
        path=str(folder.path), model_type=folder.model_type,
        config_sha256=sha256_file(folder.path / "config.json"),
        weights_sha256={file.name: sha256_file(file) for file in folder.weight_files},
    )


def check_pool_reads(graph: onnx.GraphProto, pool_names: list[str]) -> None:
    """Every read of a pool must be a gather along axis 0 (of the pool, or of a reshape of it, a view),
    so no pool-sized tensor is ever produced."""
    outputs = {o.name for o in graph.output}
    for name in pool_names:
        readers = _readers(graph, name)
        if name in outputs or not readers:
            raise ExportError(f"pool {name} is {'a graph output' if name in outputs else 'never read'}")
        for node in readers:
            if node.op_type == "Reshape" and node.input[0] == name:
                views = _readers(graph, node.output[0])
                if views and node.output[0] not in outputs and all(_gathers(v, node.output[0]) for v in views):
                    continue
            elif _gathers(node, name):
                continue
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            raise ExportError(
                f"pool {name} is read by {node.op_type} {node.name!r} {attrs}; only gathers along axis 0 "
                f"(Gather axis 0, GatherND batch_dims 0, of the pool or a Reshape of it) may read a pool, "
                f"anything else copies it"
            )


def _readers(graph: onnx.GraphProto, name: str) -> list[onnx.NodeProto]:
    return [node for node in graph.node if name in node.input]


def _gathers(node: onnx.NodeProto, name: str) -> bool:
    """node gathers rows of `name` along axis 0."""
    allowed = POOL_READERS.get(node.op_type)
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    return allowed is not None and attrs.get(allowed[0], 0) == allowed[1] and node.input[0] == name


def _apply_specs(values, specs: tuple[TensorSpec, ...]) -> None:
    """Set each graph input/output's dtype check and shape (axis names) from its spec."""
    by_name = {s.name: s for s in specs}
    found = [v.name for v in values]
    if sorted(found) != sorted(by_name):
        raise ExportError(f"graph has {found}, the spec declares {list(by_name)}")
    for value in values:
        spec = by_name[value.name]
        tensor_type = value.type.tensor_type
        if tensor_type.elem_type != onnx.helper.np_dtype_to_tensor_dtype(np.dtype(spec.dtype)):
            raise ExportError(f"{value.name}: graph dtype {tensor_type.elem_type} is not {spec.dtype}")
        tensor_type.shape.ClearField("dim")
        for axis in spec.shape:
            dim = tensor_type.shape.dim.add()
            if isinstance(axis, str):
                dim.dim_param = axis
            else:
                dim.dim_value = axis


def _initializer_bytes(model: onnx.ModelProto) -> int:
    total = 0
    for tensor in model.graph.initializer:
        itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
        total += int(np.prod(tensor.dims, dtype=np.int64)) * itemsize
    return total

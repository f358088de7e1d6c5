"""Runs an exported step graph with ONNX Runtime; owns the K/V pools, allocated once at start."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from lepton.manifest import MANIFEST_FILE, Manifest
from lepton.batch import ModelInput
from lepton.config import EngineConfig
from lepton.errors import ConfigError, ModelFolderError
from lepton.memory import advise_huge_pages, aligned_zeros, check_fits, kv_budget_bytes, populate
from lepton.model_folder import ModelFolder
from lepton.native import ops_library
from lepton.runners.bf16_graph import bf16_graph, instructions as bf16_instructions, unavailable as bf16_unavailable
from lepton.runners.f32_graph import f32_graph
from lepton.runners.epilogue_graph import epilogue_graph
from lepton.runners.norm_graph import norm_graph
from lepton.runners.q4_graph import INT8_LEVEL, q4_graph
from lepton.runners.q8_graph import bfloat16_kernels, int16_activations, matmul_kernel, q8_graph
from lepton.runners.rescore_graph import rescore_graph

INDEX_INPUTS = (
    "input_ids", "positions", "token_index", "token_slot", "query_lens",
    "context_lens", "block_tables", "logits_indices",
)
OUTPUTS = ("logits", "new_k", "new_v")


def open_export_folder(path: str | Path) -> ModelFolder:
    """Check an export folder (manifest, graph, config, tokenizer) and describe it as a ModelFolder."""
    path = Path(path).expanduser().resolve()
    manifest = Manifest.load(path / MANIFEST_FILE)
    for name in (manifest.model_file, manifest.external_data or manifest.model_file, "config.json", "tokenizer.json"):
        if not (path / name).is_file():
            raise ModelFolderError(f"{path}: export folder has no {name}; export it again")
    config = json.loads((path / "config.json").read_text())
    # NOTE: weight_files is empty: the weights live in the graph (or its external data), never in a pickle.
    return ModelFolder(path=path, config=config, weight_files=(), tokenizer_file=path / "tokenizer.json")


def make_session(model: Path | bytes, num_threads: int, profile_prefix: str | None = None,
                 data_folder: Path | None = None, spin_wait: bool = False,
                 spin_duration_us: int = 0, ops_library: Path | None = None) -> ort.InferenceSession:
    """A CPU session over a graph file or serialized graph: intra-op threads from the config, sequential
    execution; profile_prefix: ORT's op profile; data_folder: where a serialized graph's external data is;
    spin_wait: threads spin between ops while a run lasts (never after it), each time for at most
    spin_duration_us (0: ONNX Runtime's default); ops_library: a custom-operator library to register
    (lepton.native's)."""
    options = ort.SessionOptions()
    if ops_library is not None:
        options.register_custom_ops_library(str(ops_library))
    if data_folder is not None:
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(data_folder))
    if profile_prefix is not None:
        options.enable_profiling, options.profile_file_prefix = True, profile_prefix
    options.intra_op_num_threads = num_threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # NOTE: never spinning after a run: the engine thread samples with torch right after each step, and
    # Triton's front end shares the cores; spinning would take those cycles.
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin_wait else "0")
    options.add_session_config_entry("session.force_spinning_stop", "1")
    if spin_wait and spin_duration_us:
        options.add_session_config_entry("session.intra_op.spin_duration_us", str(spin_duration_us))
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


@dataclass(frozen=True)
class DecodeReads:
    """Bytes of weights one decode step's products read (graph_edit.product_weight_bytes): the bandwidth floor of
    a token is these over the machine's read bandwidth (benchmarks.peers)."""

    argmax_only: int  # a step whose sampler reads only the argmax (the head's draft where the graph has one)
    full_logits: int  # any other step


class OnnxRunner:
    """An ONNX Runtime session plus per-layer K and V pools [num_blocks, block_size, KVH, D]."""

    weight_copies = 1  # sessions holding the weights (each prepacks its own)
    decode_reads: DecodeReads | None = None  # counted where the runner rewrites its graph (SlotRunner)

    def __init__(self, folder: ModelFolder | str | Path, config: EngineConfig,
                 profile_prefix: str | None = None) -> None:
        """profile_prefix: write ONNX Runtime's per-op profile there (benchmarks.step_shapes --ort-profile)."""
        path = folder.path if isinstance(folder, ModelFolder) else Path(folder)
        # NOTE: with this runner torch only samples from the logits. Its OpenMP threads then fight ONNX
        # Runtime's for the cores: on 2 busy cores, isnan().any() and argmax over [16, 49152] logits took
        # 24 and 12 ms with 2 torch threads, 0.7 and 0.5 ms with 1 (docs/performance.md).
        torch.set_num_threads(1)
        self.manifest = Manifest.load(path / MANIFEST_FILE)
        self.model_config = self.manifest.model_config
        self.block_size = _check_config(self.manifest, config, path)
        if config.runner.deterministic:
            _check_deterministic(self.manifest, path)
        weights = sum(f.stat().st_size for f in path.iterdir() if f.name.startswith(self.manifest.model_file))
        weights *= self.weight_copies
        kv_bytes = kv_budget_bytes(config.cache, weights)
        check_fits(path, weights, kv_bytes)
        self.num_blocks = _num_blocks(self.manifest, kv_bytes)
        self.session = self._session(path, config, profile_prefix)
        cfg = self.model_config
        shape = (self.num_blocks, self.block_size, cfg.num_kv_heads, cfg.head_dim)
        dtype = np.dtype(self.manifest.kv_dtype)
        # NOTE: zero-filled so masked-out slots never hold NaN (0 * NaN would poison attention).
        # These arrays are never reallocated: the OrtValues below wrap their memory. Each layer's pool
        # is a view of one array per kind [layers, blocks, block_size, KVH, D], so that writing a step's
        # K/V into every layer is one numpy operation.
        self.k_store = aligned_zeros((cfg.num_layers, *shape), dtype)
        self.v_store = aligned_zeros((cfg.num_layers, *shape), dtype)
        self.k_pools, self.v_pools = list(self.k_store), list(self.v_store)
        self._bind_pools(config)
        # NOTE: the weights ONNX Runtime and the operators now hold, into 2 MiB pages (lepton.memory)
        if advised := advise_huge_pages():
            print(f"[lepton] transparent huge pages: {advised >> 20} MiB of this process's large resident mappings "
                  f"(the weights among them) collapsed", flush=True)
        # NOTE: the pools' memory now, not a page fault at a time while serving (after the collapse: huge
        # pages for them cost more at load than they saved, lepton.memory.populate)
        populate(self.k_store)
        populate(self.v_store)

    def _session(self, path: Path, config: EngineConfig, profile_prefix: str | None) -> ort.InferenceSession:
        return self._export_session(path, config, profile_prefix, *self._products(path, config, None))

    def _export_session(self, path: Path, config: EngineConfig, profile_prefix: str | None,
                        model: onnx.ModelProto | bytes | None, library: Path | None) -> ort.InferenceSession:
        """A session over the export's graph: `model` (its products rewritten, `library` registered; a message
        or serialized) or, when None, the file as it is."""
        source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
        session = make_session(source if source is not None else path / self.manifest.model_file,
                               config.runner.compute_threads, profile_prefix, spin_wait=config.runner.spin_wait,
                               spin_duration_us=config.runner.spin_duration_us, ops_library=library)
        _check_graph(session, self.manifest, path)
        return session

    def _products(self, path: Path, config: EngineConfig,
                  model: onnx.ModelProto | None) -> tuple[onnx.ModelProto | None, Path | None]:
        """A q8_0 export's weight products rewritten to Lepton's MatMulQ8, a q4_1 export's to MatMulQ4 (and
        its lm_head to MatMulQ8 when 8-bit, to MatMulBF16 when float32), a float32 export's to MatMulF32
        (`_f32_products`), when RunnerConfig.matmul_kernel picks Lepton's operators
        (lepton/runners/q8_graph.py, q4_graph.py; printed, with why), then each MLP's gate into its gate/up product and
        each residual add into the product before it (epilogue_graph.py), each RMS norm before them into them
        (norm_graph.py). model: the export's graph to rewrite,
        None to read it here. Returns the graph (rewritten, or `model` as given) and the library to
        register (None when nothing was rewritten)."""
        quantization = self.manifest.quantization
        if config.runner.weight_dtype == "bfloat16":
            return self._bf16_products(path, config, model)
        if quantization is None:
            return self._f32_products(path, config, model)
        if quantization.method not in ("q8_0", "q4_1"):
            return model, None
        method = quantization.method
        library = ops_library()
        kernel, why = matmul_kernel(config.runner.matmul_kernel, library, method=method,
                                    int8_activations=quantization.accuracy_level == INT8_LEVEL)
        if kernel == "lepton" and self.manifest.external_data is not None:
            kernel, why = "onnxruntime", "the export keeps its weights in an external file"
        count, head, head8, int8, int16, epilogues, rescored = 0, 0, 0, 0, 0, (0, 0, 0), 0
        if kernel == "lepton":
            model = onnx.load(str(path / self.manifest.model_file)) if model is None else model
            if method == "q8_0":
                count = q8_graph(model)
            else:  # NOTE: an 8-bit lm_head (--lm-head q8_0) beside the 4-bit layers goes to MatMulQ8
                count, head = q4_graph(model, bfloat16_kernels(config.runner.matmul_kernel), int16_activations())
                head8 = q8_graph(model) if count else 0
                int8, int16 = (sum(node.op_type == "MatMulQ4" and any(a.name == name and a.i for a in node.attribute)
                                   for node in model.graph.node) for name in ("int8", "int16"))
            if not count:
                why = ("no MatMulNBits node of 8 bits, blocks of 32, accuracy level 4" if method == "q8_0"
                       else "no q4_1 product (4-bit MatMulNBits in blocks of 32 plus its offsets)")
            epilogues = (*epilogue_graph(model), norm_graph(model)) if count else (0, 0, 0)
            rescored = rescore_graph(model) if count else 0
        if method == "q8_0":
            what = f"Lepton's MatMulQ8 ({count} nodes; {why})" if count else f"ONNX Runtime's MatMulNBits ({why})"
            print(f"[lepton] 8-bit weight products: {what}", flush=True)
        else:
            rest = (f"; the float32 products left, {head}, in bfloat16: MatMulBF16" if head else "") + (
                f"; the 8-bit ones, {head8}: MatMulQ8" if head8 else "")
            others = "int16" if int16 else "bfloat16"
            activations = (f", {int8} with int8 activations, {count - int8} {others}" if int8 and int8 < count
                           else ", int8 activations" if int8 else ", int16 activations" if int16 else "")
            what = (f"Lepton's MatMulQ4 ({count} nodes{activations}{rest}; {why})" if count
                    else f"ONNX Runtime's MatMulNBits ({why})")
            print(f"[lepton] 4-bit weight products: {what}", flush=True)
        if count:
            _print_epilogues(*epilogues)
        if rescored:
            print("[lepton] the lm_head's top candidates rescored in one node: Lepton's TopKRescore", flush=True)
        return model, library if count else None

    def _f32_products(self, path: Path, config: EngineConfig,
                      model: onnx.ModelProto | None) -> tuple[onnx.ModelProto | None, Path | None]:
        """A float32 export's weight products rewritten to Lepton's MatMulF32 (lepton/runners/f32_graph.py) when
        RunnerConfig.matmul_kernel picks Lepton's operators, then the epilogues and norms into them, as `_products`;
        printed, with why."""
        library = ops_library()
        kernel, why = matmul_kernel(config.runner.matmul_kernel, library, method="float32")
        if kernel == "lepton" and self.manifest.external_data is not None:
            kernel, why = "onnxruntime", "the export keeps its weights in an external file"
        count = 0
        if kernel == "lepton":
            model = onnx.load(str(path / self.manifest.model_file)) if model is None else model
            count = f32_graph(model)
            why = why if count else "no product of an activation with a float32 weight"
        what = f"Lepton's MatMulF32 ({count} nodes; {why})" if count else f"ONNX Runtime's MatMul and Gemm ({why})"
        print(f"[lepton] float32 weight products: {what}", flush=True)
        if not count:
            return model, None
        _print_epilogues(*epilogue_graph(model), norm_graph(model))
        return model, library

    def _bf16_products(self, path: Path, config: EngineConfig,
                       model: onnx.ModelProto | None) -> tuple[onnx.ModelProto, Path]:
        """weight_dtype=bfloat16: a float32 export's weight products rewritten to Lepton's MatMulBF16
        (lepton/runners/bf16_graph.py), each MLP's gate and residual add into the products (epilogue_graph.py) and
        the RMS norms before them (norm_graph.py);
        anything that cannot is refused, naming the setting."""
        quantization = self.manifest.quantization
        if quantization is not None:
            raise ConfigError(f"weight_dtype=bfloat16: {path} is a {quantization.method} export; bfloat16 "
                              f"products are made from a float32 export's weights (or set weight_dtype=export)")
        if self.manifest.external_data is not None:
            raise ConfigError(f"weight_dtype=bfloat16: {path} keeps its weights in an external file, which the "
                              f"rewrite does not read (or set weight_dtype=export)")
        if why := bf16_unavailable():
            raise ConfigError(f"weight_dtype=bfloat16: {why}; set weight_dtype=export (or serve a q8_0 export)")
        library = ops_library()
        model = onnx.load(str(path / self.manifest.model_file)) if model is None else model
        count = bf16_graph(model)
        if not count:
            raise ConfigError(f"weight_dtype=bfloat16: {path} has no float32 weight product to rewrite")
        print(f"[lepton] weight products in bfloat16: Lepton's MatMulBF16 ({count} nodes; {bf16_instructions()})", flush=True)
        _print_epilogues(*epilogue_graph(model), norm_graph(model))
        return model, library

    def _bind_pools(self, config: EngineConfig) -> None:
        self._binding, self.pool_values = bind_pools(self.session, self.k_pools, self.v_pools)

    def clear(self) -> None:
        """Forget every cached K/V (validation runs scenarios from empty pools)."""
        self.k_store.fill(0)
        self.v_store.fill(0)

    def execute(self, batch: ModelInput) -> torch.Tensor:
        """Compute one step, write its K/V into the pools, return float32 logits [L, vocab]."""
        return torch.from_numpy(self.run_step(batch))

    def run_step(self, batch: ModelInput) -> np.ndarray:
        """One step as one graph run per query-length group; float32 logits [L, vocab] in scheduled order."""
        parts = split_by_query_len(batch, self.block_size)
        if len(parts) == 1:
            return self.run(batch)[0]
        logits = np.empty((len(batch.logits_indices), self.model_config.vocab_size), np.float32)
        for part, rows in parts:
            logits[rows] = self.run(part)[0]
        return logits

    def run(self, batch: ModelInput) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One graph run over the whole batch, as laid out: numpy logits [L, V] and the step's new_k,
        new_v [layers, T, KVH, D]; the new K/V are written into the pools."""
        return run_paged(self.session, self._binding, batch, self.k_pools, self.v_pools)


def shared_value(array: np.ndarray, what: str, memory: np.ndarray | None = None) -> ort.OrtValue:
    """An OrtValue over array's memory (memory's, when array is a view of it: a graph that writes the value writes
    them); raises if onnxruntime (or a reshape) copied it."""
    value = ort.OrtValue.ortvalue_from_numpy(array)
    if value.data_ptr() != (array if memory is None else memory).ctypes.data:
        raise RuntimeError(f"onnxruntime copied {what}; the runner relies on zero-copy binding")
    return value


def bind_pools(session: ort.InferenceSession, k_pools: list[np.ndarray],
               v_pools: list[np.ndarray]) -> tuple[ort.SessionIOBinding, list[ort.OrtValue]]:
    """A binding of the paged graph with the pools' memory bound as its pool inputs, once (no copy)."""
    binding, values = session.io_binding(), []
    for layer, (k_pool, v_pool) in enumerate(zip(k_pools, v_pools)):
        for name, pool in ((f"k_pool_{layer}", k_pool), (f"v_pool_{layer}", v_pool)):
            value = shared_value(pool, f"pool {name}")
            binding.bind_ortvalue_input(name, value)
            values.append(value)
    return binding, values


def run_paged(session: ort.InferenceSession, binding: ort.SessionIOBinding, batch: ModelInput,
              k_pools: list[np.ndarray], v_pools: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One run of the paged graph over the batch as laid out; its new K/V are written into the pools."""
    # NOTE: bind_cpu_input wraps each array without copying; `indices` keeps them alive through the run.
    indices = [np.ascontiguousarray(getattr(batch, name), dtype=np.int64) for name in INDEX_INPUTS]
    for name, array in zip(INDEX_INPUTS, indices):
        binding.bind_cpu_input(name, array)
    binding.clear_binding_outputs()
    for name in OUTPUTS:
        binding.bind_output(name, "cpu")
    session.run_with_iobinding(binding)
    logits, new_k, new_v = (value.numpy() for value in binding.get_outputs())
    slots = batch.slot_mapping
    for layer, (k_pool, v_pool) in enumerate(zip(k_pools, v_pools)):
        # NOTE: reshape of a contiguous pool is a view, so this writes the bound memory in place.
        k_pool.reshape(-1, *k_pool.shape[2:])[slots] = new_k[layer]
        v_pool.reshape(-1, *v_pool.shape[2:])[slots] = new_v[layer]
    return logits, new_k, new_v


def split_by_query_len(batch: ModelInput, block_size: int) -> list[tuple[ModelInput, np.ndarray]]:
    """The batch as sub-batches of decode rows (one query token) and longer rows, each with the
    rows of the step's logits it fills; the batch itself when it is one kind only.

    NOTE: the step graph pads every sequence's queries to the longest one (token_index [S, Q]), so
    one 128-token chunk among 16 decodes made 17 x 128 queries: mixed steps cost ~7x the parts apart.
    """
    is_decode = batch.query_lens == 1
    if is_decode.all() or not is_decode.any():
        return [(batch, np.arange(len(batch.logits_indices)))]
    return [sub_batch(batch, np.flatnonzero(rows), block_size) for rows in (is_decode, ~is_decode)]


def sub_batch(batch: ModelInput, rows: np.ndarray, block_size: int) -> tuple[ModelInput, np.ndarray]:
    """The rows' tokens as a batch of their own, and which rows of the full logits they give."""
    query_lens = batch.query_lens[rows]
    starts = batch.token_index[rows, 0]  # NOTE: a row's first flat token
    tokens = np.concatenate([np.arange(s, s + n, dtype=np.int64) for s, n in zip(starts, query_lens)])
    local = np.full(batch.num_tokens, -1, np.int64)
    local[tokens] = np.arange(tokens.size, dtype=np.int64)
    local_starts = np.concatenate([[0], np.cumsum(query_lens)[:-1]]).astype(np.int64)
    max_q = int(query_lens.max())
    offsets = np.minimum(np.arange(max_q, dtype=np.int64)[None, :], query_lens[:, None] - 1)
    token_slot = np.concatenate([row * max_q + np.arange(n, dtype=np.int64) for row, n in enumerate(query_lens)])
    sampled = local[batch.logits_indices]
    logits_rows = np.flatnonzero(sampled >= 0)
    width = -(-int(batch.context_lens[rows].max()) // block_size)  # NOTE: the group's longest table
    part = ModelInput(
        input_ids=batch.input_ids[tokens], positions=batch.positions[tokens],
        token_index=local_starts[:, None] + offsets, token_slot=token_slot, query_lens=query_lens,
        context_lens=batch.context_lens[rows], block_tables=batch.block_tables[rows, :width],
        slot_mapping=batch.slot_mapping[tokens], logits_indices=sampled[logits_rows],
        sample_request_ids=tuple(batch.sample_request_ids[i] for i in logits_rows),
        request_ids=tuple(batch.request_ids[i] for i in rows) if batch.request_ids else (),
    )
    return part, logits_rows


def _print_epilogues(gated: int, residual: int, norms: int) -> None:
    print(f"[lepton] in the weight products' own tasks: the MLPs' gate, silu(gate) x up, in {gated}; the residual "
          f"add in {residual}; the RMS norm before them, {norms} norms", flush=True)


def _check_config(manifest: Manifest, config: EngineConfig, path: Path) -> int:
    """The block size and dtype the graph was exported for must be the engine's."""
    if manifest.block_size != config.cache.block_size:
        raise ConfigError(
            f"block_size: {path} was exported with block_size {manifest.block_size}, the engine "
            f"is configured with {config.cache.block_size}; set block_size={manifest.block_size} or re-export"
        )
    if config.runner.dtype != manifest.kv_dtype:
        raise ConfigError(
            f"dtype: {path} computes in {manifest.kv_dtype} (its KV pools too); the engine asks for "
            f"{config.runner.dtype}; set dtype={manifest.kv_dtype}"
        )
    return manifest.block_size


def _check_deterministic(manifest: Manifest, path: Path) -> None:
    """deterministic=true serves float32 exports only: their logits measured batch-invariant."""
    recipe = manifest.quantization
    if recipe is not None:
        # NOTE: measured on SmolLM2 with batch mates: the int8 export's logits moved by up to 36 (one
        # activation scale for the whole step), the q4_1 export's by 1e-4; the int4 export's did not
        # move, but no test covers it.
        raise ConfigError(
            f"deterministic: {path} is quantized ({recipe.preset}), and its logits depend on the requests "
            "batched with it; serve its float32 export (python -m export onnx) or set deterministic=false"
        )


def _num_blocks(manifest: Manifest, memory_bytes: int) -> int:
    """KV blocks that fit the memory budget, K and V of all layers together (as TorchRunner)."""
    cfg = manifest.model_config
    bytes_per_block = 2 * cfg.num_layers * manifest.block_size * cfg.num_kv_heads * cfg.head_dim
    bytes_per_block *= np.dtype(manifest.kv_dtype).itemsize
    num_blocks = memory_bytes // bytes_per_block
    if num_blocks < 1:
        raise ConfigError(
            f"kv_cache_memory_bytes: {memory_bytes} bytes hold no KV block of {bytes_per_block} bytes; raise it"
        )
    return num_blocks


def _check_graph(session: ort.InferenceSession, manifest: Manifest, path: Path) -> None:
    """The session's inputs and outputs must be the ones the manifest names."""
    found = {node.name for node in session.get_inputs()} | {node.name for node in session.get_outputs()}
    expected = {spec.name for spec in manifest.inputs + manifest.outputs}
    if found != expected:
        raise ModelFolderError(
            f"{path}: {manifest.model_file} does not match manifest.json: graph-only names "
            f"{sorted(found - expected)}, manifest-only names {sorted(expected - found)}"
        )

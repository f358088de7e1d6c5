"""The ONNX Runtime runner with fused attention over per-sequence caches (attention=slots).

Same export folder, pools and step contract as OnnxRunner; the graph is rewritten at load
(lepton/runners/slot_graph.py) so that each layer's attention is one GroupQueryAttention over a
contiguous cache per running sequence (lepton/runners/slot_cache.py) instead of per-layer gathers
from the block pools. A step runs its decode rows as one graph run over slots 0 .. B-1, its prompts from their first
token as one padded run right above them, and each chunk after cached tokens as a run of its own;
this step's K/V are then copied into the pools, which stay what prefix caching, validation and a
refilled slot read.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from lepton.batch import ModelInput
from lepton.config import EngineConfig
from lepton.models.llama import rope_tables
from lepton.models.loader import rope_parameters
from lepton.runners.onnx_runner import OnnxRunner, make_session, open_export_folder
from lepton.runners.slot_cache import SlotCache
from lepton.runners.slot_graph import slot_graph

# NOTE: bindings are cached per (first slot, rows); a server sees at most max_num_seqs + 1 kinds.
MAX_BINDINGS = 256


class SlotRunner(OnnxRunner):
    """OnnxRunner whose graph attends over slots; `slots` holds the per-sequence caches."""

    def _session(self, path: Path, config: EngineConfig, profile_prefix: str | None) -> ort.InferenceSession:
        cfg = self.model_config
        cos, sin = rope_tables(*rope_parameters(open_export_folder(path)), cfg.max_position_embeddings)
        # NOTE: external weights stay in their file: the rewritten graph (without them) is handed over
        # serialized, which protobuf caps at 2 GiB, and ONNX Runtime reads the weights from the folder.
        external = self.manifest.external_data is not None
        model = slot_graph(onnx.load(str(path / self.manifest.model_file), load_external_data=not external), cfg,
                           cos.numpy(), sin.numpy())
        return make_session(model.SerializeToString(), config.runner.compute_threads, profile_prefix,
                            data_folder=path if external else None)

    def _bind_pools(self, config: EngineConfig) -> None:
        cfg = self.model_config
        max_len = min(config.max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        self.slots = SlotCache(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, np.dtype(self.manifest.kv_dtype),
                               self.block_size, max_capacity=max_len)
        self._bindings: dict[tuple[int, int], ort.SessionIOBinding] = {}  # (first slot, rows) -> binding
        self._bindings_generation = self.slots.generation

    def clear(self) -> None:
        super().clear()
        self.slots.drop_all()

    def run_step(self, batch: ModelInput) -> np.ndarray:
        return self.run(batch)[0]

    def run(self, batch: ModelInput) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One step: float32 logits [L, vocab] in scheduled order and the step's new_k, new_v
        [layers, T, KVH, D], which are also written into the pools."""
        if len(batch.request_ids) != len(batch.query_lens):
            raise ValueError("the slot runner needs ModelInput.request_ids (lepton.batch.build_model_input sets them)")
        ids, query_lens, context_lens = batch.request_ids, batch.query_lens, batch.context_lens
        starts = np.concatenate([[0], np.cumsum(query_lens)[:-1]]).astype(np.int64)
        cached = context_lens - query_lens
        decodes = np.flatnonzero(query_lens == 1)
        fresh = np.flatnonzero((query_lens > 1) & (cached == 0))  # NOTE: whole prompts or first chunks
        others = np.flatnonzero((query_lens > 1) & (cached > 0))
        self.slots.reserve(list(ids), int(context_lens.max()))
        self.slots.place([ids[r] for r in decodes], [ids[r] for r in others], [ids[r] for r in fresh])
        for row, request in enumerate(ids):
            self.slots.fill(request, int(cached[row]), batch.block_tables[row], self.k_pools, self.v_pools)
        logits_rows = np.repeat(np.arange(len(ids)), query_lens)[batch.logits_indices]
        logits = np.empty((len(batch.logits_indices), self.model_config.vocab_size), np.float32)
        token_slots = np.empty(batch.num_tokens, np.int64)
        # NOTE: one run for the decodes (slots 0 .. D-1), one for the fresh prompts padded to the longest
        # (slots D ..), one per chunk after cached tokens (GroupQueryAttention takes those one at a time).
        for rows in [decodes, fresh] + [np.array([row]) for row in others]:
            if rows.size:
                self._run_rows(rows, starts, batch, logits_rows, logits, token_slots)
        for row, request in enumerate(ids):
            self.slots.commit(request, int(context_lens[row]), batch.block_tables[row])
        return (logits, *self._store_new_kv(token_slots, batch))

    def _run_rows(self, rows: np.ndarray, starts: np.ndarray, batch: ModelInput, logits_rows: np.ndarray,
                  logits: np.ndarray, token_slots: np.ndarray) -> None:
        """One graph run over the rows' slots (consecutive), filling their logits and their tokens' slots."""
        slots = np.array([self.slots.index[batch.request_ids[r]] for r in rows])
        rows = rows[np.argsort(slots)]  # NOTE: graph row i is slot first + i
        first = int(slots.min())
        length = int(batch.query_lens[rows].max())
        graph_row = np.full(len(batch.query_lens), -1, np.int64)
        graph_row[rows] = np.arange(rows.size)
        wanted = np.flatnonzero(graph_row[logits_rows] >= 0)
        local = graph_row[logits_rows[wanted]] * length + batch.logits_indices[wanted] - starts[logits_rows[wanted]]
        logits[wanted] = self._run_graph(first, rows, length, starts, batch, local)
        for slot, row in enumerate(rows, start=first):
            token_slots[starts[row]:starts[row] + batch.query_lens[row]] = slot

    def _run_graph(self, first: int, rows: np.ndarray, length: int, starts: np.ndarray, batch: ModelInput,
                   logits_indices: np.ndarray) -> np.ndarray:
        """One graph run over slots [first, first + len(rows)); shorter rows are padded with their last token
        (their padding's K/V land past their length, where nothing reads them)."""
        binding = self._binding(first, rows.size)
        offsets = np.minimum(np.arange(length)[None, :], batch.query_lens[rows][:, None] - 1)
        tokens = (starts[rows][:, None] + offsets).reshape(-1)
        context = batch.context_lens[rows]
        inputs = {
            "input_ids": np.ascontiguousarray(batch.input_ids[tokens].reshape(rows.size, length)),
            "seqlens_k": (context - 1).astype(np.int32),
            "total_sequence_length": np.array(context.max(), np.int32),
            "logits_indices": np.ascontiguousarray(logits_indices, np.int64),
        }
        for name, array in inputs.items():
            binding.bind_cpu_input(name, array)
        binding.bind_output("logits", "cpu")
        self.session.run_with_iobinding(binding)
        return binding.get_outputs()[0].numpy()

    def _binding(self, first: int, count: int) -> ort.SessionIOBinding:
        """A binding whose past and present caches are slots [first, first + count), shared in place."""
        if self._bindings_generation != self.slots.generation or len(self._bindings) > MAX_BINDINGS:
            self._bindings.clear()  # NOTE: reallocated arrays: the bound views are stale
            self._bindings_generation = self.slots.generation
        key = (first, count)
        if key not in self._bindings:
            binding = self.session.io_binding()
            binding.bind_output("logits", "cpu")  # NOTE: first, so get_outputs()[0] is the logits
            for layer in range(self.model_config.num_layers):
                for kind, arrays in (("key", self.slots.keys), ("value", self.slots.values)):
                    view = arrays[layer][first:first + count]
                    value = ort.OrtValue.ortvalue_from_numpy(view)
                    if value.data_ptr() != view.ctypes.data:
                        raise RuntimeError("onnxruntime copied a slot cache; the runner relies on zero-copy binding")
                    binding.bind_ortvalue_input(f"past_{kind}_{layer}", value)
                    binding.bind_ortvalue_output(f"present_{kind}_{layer}", value)
            self._bindings[key] = binding
        return self._bindings[key]

    def _store_new_kv(self, token_slots: np.ndarray, batch: ModelInput) -> tuple[np.ndarray, np.ndarray]:
        """This step's K/V read back from the slots [layers, T, KVH, D] and written into the pools."""
        news = []
        for pools, caches in ((self.k_pools, self.slots.keys), (self.v_pools, self.slots.values)):
            new = np.empty((len(pools), batch.num_tokens, *pools[0].shape[2:]), pools[0].dtype)
            for layer, (pool, cache) in enumerate(zip(pools, caches)):
                new[layer] = cache[token_slots, :, batch.positions, :]
                pool.reshape(-1, *pool.shape[2:])[batch.slot_mapping] = new[layer]
            news.append(new)
        return news[0], news[1]

"""The ONNX Runtime runner with fused attention over per-sequence caches (attention=slots).

Same export folder, pools and step contract as OnnxRunner; the graph is rewritten at load
(lepton/runners/slot_graph.py) so that each layer's attention is one fused operator (Lepton's
SlotAttention, or ONNX Runtime's GroupQueryAttention: attention_kernel) over a contiguous cache per running sequence (lepton/runners/slot_cache.py) instead of per-layer gathers
from the block pools. A step runs its decode rows as one graph run over slots 0 .. B-1, its prompts from their first
token as one padded run right above them, and a chunk after cached tokens (a prefix-cache hit, a long
prompt's later chunk) in its slot when it is the step's only one. Both operators take such chunks one
sequence at a time (as GroupQueryAttention's CPU kernel defines them), so two or more run together through the paged graph instead (a
second session over the same export, reading the pools): one pass over the weights, as OnnxRunner
does; so does a whole step whose slots would pass their memory budget (SLOT_BUDGET_POOLS). Every
step's K/V end in the pools, which stay what prefix caching, validation and a refilled slot read: Lepton's
SlotAttention writes them there as it writes the slots (`pools_in_graph`), ONNX Runtime's GroupQueryAttention
leaves them to a copy after the run (`SlotCache.to_pools`). A step that
decodes the same requests as the step before, each still in its slot, skips the slots' bookkeeping
(`_repeat_decodes`): most steps of a steady batch. A step whose sampler reads only each row's argmax (greedy, no
logprobs or penalties: ModelInput.argmax_only) runs the head's 4-bit draft instead of the head itself where the
slot graph has one (RunnerConfig.draft_head, lepton/runners/draft_head.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from lepton.autoselect import cpu_features
from lepton.batch import ModelInput
from lepton.config import EngineConfig
from lepton.models.llama import rope_tables
from lepton.models.loader import rope_parameters
from lepton.memory import available_bytes
from lepton.native import ops_library
from lepton.runners.draft_head import FLAG as DRAFT_FLAG
from lepton.runners.draft_head import draft_head_graph
from lepton.runners.graph_edit import product_weight_bytes
from lepton.runners.onnx_runner import (DecodeReads, OnnxRunner, bind_pools, make_session, open_export_folder, run_paged,
                                        shared_value, sub_batch)
from lepton.runners.slot_cache import SlotCache
from lepton.runners.slot_graph import slot_graph

# NOTE: bindings are cached per (first slot, rows); a server sees at most max_num_seqs + 1 kinds.
MAX_BINDINGS = 256
# NOTE: the slots hold a copy of every running sequence's K/V, a shared prefix once per sequence, padded
# to the step's longest context: they may take SLOT_BUDGET_POOLS times the pools' bytes, at least
# SLOT_BUDGET_FLOOR (pools sized to a few requests, as validation sizes them, still fit their steps), at
# most half the memory available at load; a step needing more runs through the paged graph. The served
# workloads of docs/benchmarks.md needed up to 1.4 GB with 1 GiB of pools for SmolLM2 (16 x 1,040 tokens).
SLOT_BUDGET_POOLS = 4
SLOT_BUDGET_FLOOR = 256 << 20


def attention_kernel(setting: str, library: Path | None) -> str:
    """The slot graph's attention for RunnerConfig.attention_kernel: "lepton" (lepton.native's SlotAttention)
    when asked or, with "auto", when its library is built; "onnxruntime" (GroupQueryAttention) otherwise."""
    if setting == "lepton" and library is None:
        raise RuntimeError("attention_kernel=lepton: lepton/native/liblepton_ops.so is not built (or older than "
                           "its source); run scripts/build_native.sh (make setup does), or set attention_kernel="
                           "onnxruntime")
    if setting == "auto":
        return "lepton" if library is not None else "onnxruntime"
    return setting


def kv_cache_dtype(setting: str, kernel: str, approximate: bool) -> str:
    """The slots' dtype for RunnerConfig.kv_cache_dtype: "float16" or "int8" when asked (each needs Lepton's SlotAttention)
    or, with "auto", where Lepton's SlotAttention attends and the weights are already approximate (a
    quantized export, weight_dtype=bfloat16: each served only under a quality gate measured through this
    runner); "float32" otherwise (a float32 export stays float32 throughout, as validated against PyTorch)."""
    if setting in ("float16", "int8") and kernel != "lepton":
        raise RuntimeError(f"kv_cache_dtype={setting}: Lepton's SlotAttention is not available (lepton/native/"
                           "liblepton_ops.so is not built or older than its source; scripts/build_native.sh builds "
                           "it), or set kv_cache_dtype=auto")
    if setting == "auto":
        return "float16" if kernel == "lepton" and approximate else "float32"
    return setting


def describe_kernel(kernel: str, setting: str) -> str:
    """What attends, and why (printed at load)."""
    if kernel == "lepton":
        return f"Lepton's SlotAttention ({ops_library()})"
    why = "attention_kernel=onnxruntime" if setting == "onnxruntime" else \
        "lepton/native is not built or older than its source: scripts/build_native.sh builds it"
    return f"ONNX Runtime's GroupQueryAttention ({why})"


@dataclass(frozen=True)
class _Decodes:
    """A step of decodes alone that ran in their slots: what the next step of the same requests reuses."""

    request_ids: tuple[str, ...]
    slots: list[int]  # the slot of each row (scheduled order)
    order: np.ndarray  # rows by slot: graph row i is slot first + i
    graph_rows: np.ndarray  # the graph row of each scheduled row (its logits' index in the graph's output)
    first: int
    generation: int  # SlotCache.generation when they were placed
    slot_array: np.ndarray  # slots as int64, for the copy into the pools
    in_order: bool  # scheduled row i is in slot first + i (order is the identity)


class _Binding:
    """A binding of the slot graph over slots [first, first + rows) and the inputs of a decode step over them:
    arrays of its own, bound once and written in place each step (binding the five inputs and the logits every run
    took ~0.08 ms of a one-decode step, its calls out of cache after the run: docs/performance.md)."""

    def __init__(self, io: ort.SessionIOBinding, rows: int, pools: bool) -> None:
        self.io, self.rows = io, rows
        self.decode_inputs = {
            "input_ids": np.zeros((rows, 1), np.int64),
            "seqlens_k": np.zeros(rows, np.int32),
            "total_sequence_length": np.zeros((), np.int32),
            "logits_indices": np.zeros(rows, np.int64),
        } | ({"pool_rows": np.full(rows, -1, np.int64)} if pools else {})
        self.decode_bound = False  # whether io holds decode_inputs (a longer run binds arrays of its own)
        self.flag: bool | None = None  # the argmax_only flag io holds
        self.out_bound: np.ndarray | None = None  # the runner's transient logits buffer when io's logits are in it

    def bind_decode_inputs(self) -> dict[str, np.ndarray]:
        """decode_inputs, bound to io (once, until another run binds other arrays)."""
        if not self.decode_bound:
            for name, array in self.decode_inputs.items():
                self.io.bind_ortvalue_input(name, shared_value(array, "a decode input"))
            self.decode_bound = True
        return self.decode_inputs


class SlotRunner(OnnxRunner):
    """OnnxRunner whose graph attends over slots; `slots` holds the per-sequence caches, `paged_session`
    runs the export as it is for steps with several chunks after cached tokens."""

    weight_copies = 2  # NOTE: the slot graph's session and the paged one each hold (and prepack) the weights
    # NOTE: True (the engine sets it): a step of the same decodes as the step before returns its logits in the
    # runner's own buffer, which the next step overwrites; False: every step's logits are a new array
    transient_logits = False

    def _session(self, path: Path, config: EngineConfig, profile_prefix: str | None) -> ort.InferenceSession:
        cfg = self.model_config
        cos, sin = rope_tables(*rope_parameters(open_export_folder(path)), cfg.max_position_embeddings)
        # NOTE: external weights stay in their file: the rewritten graph (without them) is handed over
        # serialized, which protobuf caps at 2 GiB, and ONNX Runtime reads the weights from the folder.
        external = self.manifest.external_data is not None
        # NOTE: the export read and its products rewritten once, for both sessions (the paged one gets it
        # serialized: a copy of the message would hold the weights once more)
        model, products_library = self._products(
            path, config, onnx.load(str(path / self.manifest.model_file), load_external_data=not external))
        paged = model.SerializeToString() if products_library is not None else None
        self.paged_session = self._export_session(path, config, None, paged, products_library)
        del paged
        library = ops_library()
        self.attention_kernel = attention_kernel(config.runner.attention_kernel, library)
        approximate = self.manifest.quantization is not None or config.runner.weight_dtype == "bfloat16"
        self.kv_cache_dtype = kv_cache_dtype(config.runner.kv_cache_dtype, self.attention_kernel, approximate)
        print(f"[lepton] attention=slots: {describe_kernel(self.attention_kernel, config.runner.attention_kernel)}, "
              f"{self.kv_cache_dtype} slots", flush=True)
        # NOTE: the attention writes each step's K/V into float32 pools itself (while they are in cache: a
        # 16-decode step of SmolLM2 spent ~0.35 ms copying them over after the run, docs/performance.md)
        self.pools_in_graph = self.attention_kernel == "lepton" and np.dtype(self.manifest.kv_dtype) == np.float32
        model = slot_graph(model, cfg, cos.numpy(), sin.numpy(), kernel=self.attention_kernel,
                           cache_dtype=self.kv_cache_dtype, pools=self.pools_in_graph)
        self.draft_head = self._draft_head(model, config)
        self.decode_reads = DecodeReads(product_weight_bytes(model.graph, then_branch=True),
                                        product_weight_bytes(model.graph, then_branch=False))
        print(f"[lepton] one decode step's weight products read {self.decode_reads.argmax_only / 1e6:.1f} MB when "
              f"only the argmax is sampled, {self.decode_reads.full_logits / 1e6:.1f} MB otherwise", flush=True)
        # NOTE: the message freed before the session is made: protobuf keeps what the rewrites removed from it
        # (the weights before packing) until the whole message goes
        serialized = model.SerializeToString()
        del model
        return make_session(serialized, config.runner.compute_threads, profile_prefix,
                            data_folder=path if external else None, spin_wait=config.runner.spin_wait,
                            spin_duration_us=config.runner.spin_duration_us,
                            ops_library=library if self.attention_kernel == "lepton" else products_library)

    @staticmethod
    def _draft_head(model: onnx.ModelProto, config: EngineConfig) -> bool:
        """The slot graph's head (a rescored 8-bit one, or a tied MatMulF32 / MatMulBF16 one) given a 4-bit draft for
        argmax-only steps (lepton/runners/draft_head.py) where RunnerConfig.draft_head and the processor allow; printed.
        (deterministic=true never comes here: it serves attention=paged, whose head stays as exported.)"""
        if not config.runner.draft_head:
            print("[lepton] lm_head: as exported for every step (draft_head=false)", flush=True)
            return False
        cpu = cpu_features()
        if not ((cpu.get("avx512_vnni") and cpu.get("avx512f")) or (cpu.get("avx2") and cpu.get("fma"))):
            print("[lepton] lm_head: as exported for every step (neither AVX-512 VNNI nor AVX2 + FMA for its 4-bit "
                  "draft)", flush=True)
            return False
        draft = draft_head_graph(model)
        if draft:
            print(f"[lepton] lm_head: steps that read only the argmax (greedy, no logprobs or penalties) pick its "
                  f"candidates with a 4-bit draft (MatMulQ4, {draft / 1e6:.1f} MB) and rescore them as the head "
                  f"computes; the other steps read the head itself", flush=True)
        return bool(draft)

    def _bind_pools(self, config: EngineConfig) -> None:
        cfg = self.model_config
        max_len = min(config.max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        pool_bytes = sum(pool.nbytes for pool in self.k_pools + self.v_pools)
        dtype = np.dtype({"float16": np.float16, "int8": np.uint8}.get(self.kv_cache_dtype, self.manifest.kv_dtype))
        self.slots = SlotCache(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, dtype,
                               self.block_size, max_capacity=max_len,
                               max_bytes=min(max(SLOT_BUDGET_POOLS * pool_bytes, SLOT_BUDGET_FLOOR),
                                             available_bytes() // 2),
                               copy_threads=config.runner.compute_threads)
        self._bindings: dict[tuple[int, int], _Binding] = {}  # (first slot, rows) -> binding
        self._bindings_generation = self.slots.generation
        self._paged_binding, self.pool_values = bind_pools(self.paged_session, self.k_pools, self.v_pools)
        self._decodes: _Decodes | None = None  # the last step, when it was decodes alone in their slots
        self._logits = np.empty((0, self.model_config.vocab_size), np.float32)  # transient_logits' buffer
        # NOTE: bound as OrtValues made once: binding a numpy scalar copies it into a new one every run
        self._flags = {flag: ort.OrtValue.ortvalue_from_numpy(np.array(flag)) for flag in (False, True)}
        self.repeated_steps = 0  # steps of the same decodes as the step before (_repeat_decodes)
        self.paged_runs = 0  # steps whose chunks after cached tokens ran through the paged graph
        self.over_budget_steps = 0  # steps that ran wholly through the paged graph: slots over their budget

    def clear(self) -> None:
        super().clear()
        self.slots.drop_all()
        self._decodes = None

    def run_step(self, batch: ModelInput) -> np.ndarray:
        """One step: float32 logits [L, vocab] in scheduled order; its K/V are written into the pools."""
        ids, query_lens, context_lens = batch.request_ids, batch.query_lens, batch.context_lens
        if len(ids) != len(query_lens):
            raise ValueError("the slot runner needs ModelInput.request_ids (lepton.batch.build_model_input sets them)")
        repeated = self._repeat_decodes(batch)
        if repeated is not None:
            return repeated
        self._decodes = None
        starts = np.concatenate([[0], np.cumsum(query_lens)[:-1]]).astype(np.int64)
        cached = context_lens - query_lens
        decodes = np.flatnonzero(query_lens == 1)
        fresh = np.flatnonzero((query_lens > 1) & (cached == 0))  # NOTE: whole prompts or first chunks
        others = np.flatnonzero((query_lens > 1) & (cached > 0))
        paged, alone = (others, others[:0]) if others.size > 1 else (others[:0], others)
        in_slots = np.concatenate([decodes, fresh, alone])
        if in_slots.size and not self.slots.fits(in_slots.size, int(context_lens[in_slots].max())):
            self.slots.release()  # NOTE: the pools hold everything; slots refill when a step fits again
            self._bindings.clear()  # NOTE: the bound views keep the old arrays alive
            self.over_budget_steps += 1
            return self._run_paged_step(batch)
        logits_rows = np.repeat(np.arange(len(ids)), query_lens)[batch.logits_indices]
        logits = np.empty((len(batch.logits_indices), self.model_config.vocab_size), np.float32)
        # NOTE: each token's slot, for the copy into the pools after the run (-1: computed by the paged graph);
        # none when the attention writes the pools itself
        token_slots = None if self.pools_in_graph else np.full(batch.num_tokens, -1, np.int64)
        if in_slots.size:
            self.slots.reserve([ids[r] for r in in_slots], int(context_lens[in_slots].max()))
            self.slots.place([ids[r] for r in decodes], [ids[r] for r in alone], [ids[r] for r in fresh])
            for row in in_slots:
                self.slots.fill(ids[row], int(cached[row]), batch.block_tables[row], self.k_store, self.v_store)
        # NOTE: one run for the decodes (slots 0 .. D-1), one for the fresh prompts padded to the longest
        # (slots D ..), one for a lone chunk after cached tokens; several such chunks: one paged run.
        for rows in (decodes, fresh, alone):
            if rows.size:
                self._run_rows(rows, starts, batch, logits_rows, logits, token_slots)
        for row in in_slots:
            self.slots.commit(ids[row], int(context_lens[row]), batch.block_tables[row])
        tokens = np.flatnonzero(token_slots >= 0) if token_slots is not None else ()
        if len(tokens):
            self.slots.to_pools(token_slots[tokens], batch.positions[tokens], batch.slot_mapping[tokens],
                                self.k_store, self.v_store)
        if paged.size:  # NOTE: their slots keep what they held; the next step that needs them refills them
            self.paged_runs += 1
            self._run_paged_rows(batch, paged, logits)
        elif decodes.size == len(ids) and len(batch.logits_indices) == len(ids):
            slots = [self.slots.index[request] for request in ids]
            order = np.argsort(slots)
            self._decodes = _Decodes(ids, slots, order, np.argsort(order), min(slots), self.slots.generation,
                                     np.array(slots, np.int64), slots == list(range(slots[0], slots[0] + len(slots))))
        return logits

    def _repeat_decodes(self, batch: ModelInput) -> np.ndarray | None:
        """The step when it decodes the same requests as the step before, each still in its slot (the
        slots' bookkeeping of run_step reduced to what changes); None for any other step."""
        last = self._decodes
        if last is None or batch.request_ids != last.request_ids or self.slots.generation != last.generation:
            return None
        count = len(last.slots)
        # NOTE: as many tokens as rows, each at least one: decodes alone (Python over numpy's reductions: after a
        # graph run each numpy call here costs 10-30 us, its code and data out of cache, docs/performance.md)
        if len(batch.logits_indices) != count or batch.num_tokens != count:
            return None
        slots = self.slots
        contexts = batch.context_lens.tolist()
        top = max(contexts)
        if top > slots.capacity or not slots.fits(count, top):
            return None
        for request, slot, context in zip(last.request_ids, last.slots, contexts):
            if slots.index.get(request) != slot or slots.length[slot] != context - 1:
                return None
        slots.touch(last.slots)
        self.repeated_steps += 1
        pools = self.pools_in_graph
        if last.in_order:
            ids, context_lens, pool_rows = batch.input_ids, batch.context_lens, batch.slot_mapping if pools else None
        else:
            order = last.order
            ids, context_lens = batch.input_ids[order], batch.context_lens[order]
            pool_rows = batch.slot_mapping[order] if pools else None
        logits = self._run_bound(self._binding(last.first, count), ids.reshape(count, 1), context_lens,
                                 last.graph_rows, None, pool_rows, batch.argmax_only, top)
        for slot, context, table in zip(last.slots, contexts, batch.block_tables):
            slots.commit_next(slot, context, table)
        if not self.pools_in_graph:
            slots.to_pools(last.slot_array, batch.positions, batch.slot_mapping, self.k_store, self.v_store)
        return logits

    def run(self, batch: ModelInput) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One step: float32 logits [L, vocab] in scheduled order and the step's new_k, new_v
        [layers, T, KVH, D] (read back from the pools, where the step wrote them)."""
        logits = self.run_step(batch)
        layers, kv_shape = self.k_store.shape[0], self.k_store.shape[3:]
        new_k, new_v = (np.take(store.reshape(layers, -1, *kv_shape), batch.slot_mapping, axis=1)
                        for store in (self.k_store, self.v_store))
        return logits, new_k, new_v

    def _run_paged_step(self, batch: ModelInput) -> np.ndarray:
        """The whole step through the paged graph, decodes and longer rows apart (as OnnxRunner runs it)."""
        logits = np.empty((len(batch.logits_indices), self.model_config.vocab_size), np.float32)
        is_decode = batch.query_lens == 1
        for rows in (np.flatnonzero(is_decode), np.flatnonzero(~is_decode)):
            if rows.size:
                self._run_paged_rows(batch, rows, logits)
        return logits

    def _run_paged_rows(self, batch: ModelInput, rows: np.ndarray, logits: np.ndarray) -> None:
        """One paged-graph run over the rows (which write their K/V into the pools), filling their logits."""
        part, logits_rows = sub_batch(batch, rows, self.block_size)
        logits[logits_rows] = run_paged(self.paged_session, self._paged_binding, part, self.k_pools, self.v_pools)[0]

    def _run_rows(self, rows: np.ndarray, starts: np.ndarray, batch: ModelInput, logits_rows: np.ndarray,
                  logits: np.ndarray, token_slots: np.ndarray | None) -> None:
        """One graph run over the rows' slots (consecutive), filling their logits and their tokens' slots."""
        slots = np.array([self.slots.index[batch.request_ids[r]] for r in rows])
        rows = rows[np.argsort(slots)]  # NOTE: graph row i is slot first + i
        first = int(slots.min())
        length = int(batch.query_lens[rows].max())
        graph_row = np.full(len(batch.query_lens), -1, np.int64)
        graph_row[rows] = np.arange(rows.size)
        wanted = np.flatnonzero(graph_row[logits_rows] >= 0)
        local = graph_row[logits_rows[wanted]] * length + batch.logits_indices[wanted] - starts[logits_rows[wanted]]
        self._run_graph(first, rows, length, starts, batch, local, logits, wanted)
        if token_slots is not None:
            for slot, row in enumerate(rows, start=first):
                token_slots[starts[row]:starts[row] + batch.query_lens[row]] = slot

    def _run_graph(self, first: int, rows: np.ndarray, length: int, starts: np.ndarray, batch: ModelInput,
                   logits_indices: np.ndarray, logits: np.ndarray, wanted: np.ndarray) -> None:
        """One graph run over slots [first, first + len(rows)), its logits written into logits[wanted];
        shorter rows are padded with their last token (their padding's K/V land past their length, where
        nothing reads them)."""
        steps = np.arange(length)[None, :]
        offsets = np.minimum(steps, batch.query_lens[rows][:, None] - 1)
        tokens = (starts[rows][:, None] + offsets).reshape(-1)
        # NOTE: the padding's tokens go into no pool row
        pool_rows = np.where(steps < batch.query_lens[rows][:, None], batch.slot_mapping[tokens].reshape(rows.size, length),
                             -1).reshape(-1) if self.pools_in_graph else None
        # NOTE: the logits go straight into their rows when these are consecutive (every step of decodes
        # alone): binding get_outputs() instead wraps all 61 outputs, ~10 % of a one-decode step served.
        consecutive = wanted.size and wanted[-1] - wanted[0] == wanted.size - 1
        out = logits[wanted[0]:wanted[-1] + 1] if consecutive else np.empty((wanted.size, logits.shape[1]), logits.dtype)
        self._run_bound(self._binding(first, rows.size), batch.input_ids[tokens].reshape(rows.size, length),
                        batch.context_lens[rows], logits_indices, out, pool_rows, batch.argmax_only)
        if not consecutive:
            logits[wanted] = out

    def _run_bound(self, binding: _Binding, input_ids: np.ndarray, context: np.ndarray,
                   logits_indices: np.ndarray, out: np.ndarray | None, pool_rows: np.ndarray | None,
                   argmax_only: bool, total: int | None = None) -> np.ndarray:
        """One run of the slot graph over a binding's slots: the rows' ids [rows, S] and contexts after the
        step (total: their largest, when the caller has it), the logits of the graph's flat tokens
        logits_indices written into out and returned (out None: a new array, or with transient_logits the
        runner's own, which the next run overwrites); with pools_in_graph each flat token's K/V into pool row
        pool_rows (-1: none; None without pools_in_graph); argmax_only: only each row's argmax is read (the
        draft head's logits, when the graph has one)."""
        io = binding.io
        if input_ids.shape == (binding.rows, 1) and logits_indices.shape == (binding.rows,):
            # NOTE: a decode step: its inputs written into the arrays the binding holds
            inputs = binding.bind_decode_inputs()
            inputs["input_ids"][:] = input_ids
            np.subtract(context, 1, out=inputs["seqlens_k"], casting="unsafe")
            inputs["total_sequence_length"][...] = context.max() if total is None else total
            inputs["logits_indices"][:] = logits_indices
            if self.pools_in_graph:
                inputs["pool_rows"][:] = pool_rows
        else:
            arrays = {
                "input_ids": np.ascontiguousarray(input_ids),
                "seqlens_k": (context - 1).astype(np.int32),
                "total_sequence_length": np.array(context.max(), np.int32),
                "logits_indices": np.ascontiguousarray(logits_indices, np.int64),
            }
            if self.pools_in_graph:
                arrays["pool_rows"] = np.ascontiguousarray(pool_rows, np.int64)
            for name, array in arrays.items():
                io.bind_cpu_input(name, array)
            binding.decode_bound = False
        if self.draft_head and binding.flag != bool(argmax_only):
            binding.flag = bool(argmax_only)
            io.bind_ortvalue_input(DRAFT_FLAG, self._flags[binding.flag])
        rows = logits_indices.shape[0]
        if out is None and self.transient_logits:
            out = self._transient_logits(rows)
            if binding.out_bound is not out.base:  # NOTE: bound once a binding (binding an output costs ~80 us cold)
                io.bind_output("logits", "cpu", 0, out.dtype, list(out.shape), out.ctypes.data)
                binding.out_bound = out.base
        else:
            if out is None:
                out = np.empty((rows, self.model_config.vocab_size), np.float32)
            io.bind_output("logits", "cpu", 0, out.dtype, list(out.shape), out.ctypes.data)
            binding.out_bound = None
        self.session.run_with_iobinding(io)
        return out

    def _transient_logits(self, rows: int) -> np.ndarray:
        """The first rows of the runner's own logits buffer (grown to fit; every binding of a decode step binds it)."""
        if self._logits.shape[0] < rows:
            self._logits = np.empty((max(rows, 2 * self._logits.shape[0]), self.model_config.vocab_size), np.float32)
        return self._logits[:rows]

    def _binding(self, first: int, count: int) -> _Binding:
        """A binding whose past and present caches are slots [first, first + count), shared in place."""
        if self._bindings_generation != self.slots.generation or len(self._bindings) > MAX_BINDINGS:
            self._bindings.clear()  # NOTE: reallocated arrays: the bound views are stale
            self._bindings_generation = self.slots.generation
        key = (first, count)
        if key not in self._bindings:
            binding = self.session.io_binding()  # NOTE: each run binds its logits buffer (_run_graph)
            for layer in range(self.model_config.num_layers):
                for kind, arrays in (("key", self.slots.keys), ("value", self.slots.values)):
                    value = shared_value(arrays[layer][first:first + count], "a slot cache")
                    binding.bind_ortvalue_input(f"past_{kind}_{layer}", value)
                    binding.bind_ortvalue_output(f"present_{kind}_{layer}", value)
            if self.pools_in_graph:  # NOTE: the same memory as the paged session's pools (written in place)
                for kind, store in (("key", self.k_store), ("value", self.v_store)):
                    layers, blocks, block_size = store.shape[:3]
                    value = shared_value(store.reshape(layers, blocks * block_size, *store.shape[3:]), "a pool", store)
                    binding.bind_ortvalue_input(f"{kind}_pools", value)
            self._bindings[key] = _Binding(binding, count, self.pools_in_graph)
        return self._bindings[key]

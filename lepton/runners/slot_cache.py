"""Contiguous per-sequence K/V caches ("slots") beside the block pools, for the slot runner.

The block pools stay the engine's truth: the block manager accounts in blocks, prefix caching shares
them, and every step's K/V are written there too. A slot is a copy that ONNX Runtime's fused attention
can read in place: per layer, keys and values [slots, KVH, capacity, D], each layer a view of one
array per kind [layers, slots, KVH, capacity, D] so that a copy across all layers is one numpy
operation. A slot is valid for a request
when it holds exactly the tokens the step says are cached; otherwise it is filled from the pools through
the block table (a prefix-cache hit, a resumed request, a slot taken by another request). Numpy, and
the copy of a step's K/V into the pools in C (lepton.native.slots_to_pools) when the library is built: after
the runs of ONNX Runtime's GroupQueryAttention (Lepton's SlotAttention writes the pools itself).

One graph run attends over the slots [first, first + B): the decode rows of a step are kept in slots
0 .. B-1 (moving rows between slots as requests come and go), prompts from their first token right
above them, a chunk after cached tokens above those.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from lepton.memory import aligned_zeros
from lepton.native import slots_to_pools

EMPTY = np.zeros(0, np.int64)
# NOTE: capacity is a multiple of CAPACITY_STEP with a quarter of headroom when it grows, and slots a
# multiple of SLOT_STEP a quarter above the rows asking: a context or batch that grows step by step
# reallocates (copying this step's rows) every few hundred tokens or every few requests, not each time.
CAPACITY_STEP = 256
SLOT_STEP = 8


SCALE_BYTES = 4  # NOTE: an 8-bit slot row (kv_cache_dtype "int8") is D int8 codes, then their float32 scale
INT8_ROWS = 2  # NOTE: lepton_slots_to_pools' `widen` for 8-bit rows (0: copied, 1: float16 widened)


def quantize_rows(rows: np.ndarray) -> np.ndarray:
    """float32 rows [..., D] as 8-bit slot rows, uint8 [..., D + 4]: codes q = x (127 / max|x|) rounded to
    nearest even, then the scale max|x| / 127 as float32 bytes; the same bits as lepton/native's
    SlotAttentionI8 writes (its quantize_row)."""
    rows = np.asarray(rows, np.float32)
    top = np.abs(rows).max(axis=-1, keepdims=True)
    with np.errstate(divide="ignore"):
        inverse = np.where(top > 0, np.float32(127) / top, np.float32(0)).astype(np.float32)
    codes = np.clip(np.rint(rows * inverse), -127, 127).astype(np.int8)
    scale = (top / np.float32(127)).astype(np.float32)
    return np.concatenate([codes.view(np.uint8), scale.view(np.uint8)], axis=-1)


def dequantize_rows(rows: np.ndarray) -> np.ndarray:
    """8-bit slot rows uint8 [..., D + 4] back to float32 [..., D] (code x scale, exact in float32)."""
    rows = np.ascontiguousarray(rows)
    codes = rows[..., :-SCALE_BYTES].view(np.int8).astype(np.float32)
    scale = np.ascontiguousarray(rows[..., -SCALE_BYTES:]).view(np.float32)
    return codes * scale


def _rounded(tokens: int, ceiling: int) -> int:
    return min(ceiling, max(CAPACITY_STEP, -(-tokens // CAPACITY_STEP) * CAPACITY_STEP))


def _headroom(rows: int) -> int:
    return -(-(rows + rows // 4) // SLOT_STEP) * SLOT_STEP


def _slot_count(rows: int) -> int:
    return -(-max(1, rows) // SLOT_STEP) * SLOT_STEP


@dataclass
class SlotCache:
    """Keys and values per layer [slots, KVH, capacity, D]; who holds each slot and how many tokens.

    dtype: the pools' (float32), or float16 (RunnerConfig.kv_cache_dtype): filled from the pools rounded to
    nearest even, copied into them widened (exact), so that pools and slots hold the same values; or uint8
    (kv_cache_dtype "int8"): each row of a kv head is D int8 codes and their float32 scale, [..., D + 4]
    (quantize_rows), filled from the pools quantized (a row's values quantize back to its codes) and copied
    into them as code x scale.

    `keys[layer]` is `key_store[layer]` (a view), and the same for values; the stores are None until
    the first reserve and after a release.
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: np.dtype
    block_size: int
    max_capacity: int  # the model's context: no slot ever holds more
    max_bytes: int | None = None  # keys and values of all layers never exceed this (None: unbounded)
    copy_threads: int = 1  # threads copying a step's K/V into the pools (to_pools), when lepton.native is built
    keys: list[np.ndarray] = field(default_factory=list)
    values: list[np.ndarray] = field(default_factory=list)
    key_store: np.ndarray | None = None  # [layers, slots, KVH, capacity, D]
    value_store: np.ndarray | None = None
    owner: list[str | None] = field(default_factory=list)
    length: list[int] = field(default_factory=list)
    last_used: list[int] = field(default_factory=list)
    tables: list[np.ndarray] = field(default_factory=list)  # the blocks whose tokens each slot holds
    index: dict[str, int] = field(default_factory=dict)  # request -> slot
    generation: int = 0  # bumped on every reallocation (bound buffers must be rebound)
    moves: int = 0  # slot-to-slot copies so far
    refills: int = 0  # fills from the pools so far
    _clock: int = 0
    _plan_key: tuple | None = None  # NOTE: what _copy_plan worked its plan out for
    _plan: tuple | None = None

    @property
    def num_slots(self) -> int:
        return len(self.owner)

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2] if self.keys else 0

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.keys + self.values)

    @property
    def int8(self) -> bool:
        """Rows of int8 codes and a scale (kv_cache_dtype "int8")."""
        return np.dtype(self.dtype) == np.uint8

    @property
    def row(self) -> int:
        """Elements of one slot row (a token's kv head): D, or D codes and SCALE_BYTES of scale."""
        return self.head_dim + (SCALE_BYTES if self.int8 else 0)

    @property
    def token_bytes(self) -> int:
        """Bytes of one token in one slot, keys and values of all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.row * np.dtype(self.dtype).itemsize

    def fits(self, rows: int, capacity: int) -> bool:
        """Whether `rows` slots of `capacity` tokens (rounded as reserve rounds them, no headroom) stay
        within max_bytes."""
        need = _slot_count(rows) * _rounded(capacity, self.max_capacity) * self.token_bytes
        return self.max_bytes is None or need <= self.max_bytes

    def release(self) -> None:
        """Free the arrays (a step over the budget runs without slots); the next reserve allocates anew."""
        self.keys.clear()
        self.values.clear()
        self.key_store = self.value_store = None
        self.owner, self.length, self.last_used, self.tables, self.index = [], [], [], [], {}
        self.generation += 1

    def reserve(self, requests: list[str], capacity: int) -> None:
        """Room for one step: a slot for each of `requests`, `capacity` tokens in every slot.

        The arrays are reallocated when too small, and when twice too large (after a burst of
        requests or a long context), so that they stay near rows x longest context: 64 slots of 2,048
        tokens are 6 GB for SmolLM2. A reallocation keeps the slots of `requests` (packed in front) and
        drops the others; a dropped request that comes back is refilled from the pools. Headroom is
        left out where it would pass max_bytes; a step that does not fit even so is refused (check
        `fits` first).
        """
        if capacity > self.max_capacity:
            raise ValueError(f"capacity {capacity} exceeds the model's {self.max_capacity} positions")
        if not self.fits(len(requests), capacity):
            raise ValueError(f"{len(requests)} slots of {capacity} tokens exceed the slot budget of "
                             f"{self.max_bytes} bytes")
        want_slots, want_cap = len(requests), _rounded(capacity, self.max_capacity)
        too_small = want_slots > self.num_slots or capacity > self.capacity
        too_large = self.num_slots > 2 * _headroom(want_slots) or self.capacity > 2 * want_cap
        if not (too_small or too_large):
            return
        new_slots = _headroom(max(1, want_slots))
        keep_cap = capacity <= self.capacity <= 2 * want_cap
        new_cap = self.capacity if keep_cap else _rounded(capacity + capacity // 4, self.max_capacity)
        if self.max_bytes is not None and new_slots * new_cap * self.token_bytes > self.max_bytes:
            new_slots, new_cap = _slot_count(want_slots), want_cap  # NOTE: fits, checked above
        kept = [(self.index[r], r) for r in requests if r in self.index]
        shape = (self.num_layers, new_slots, self.num_kv_heads, new_cap, self.row)
        stores = []
        for old in (self.key_store, self.value_store):
            store = aligned_zeros(shape, self.dtype)
            for new, (slot, _) in enumerate(kept):
                count = self.length[slot]
                store[:, new, :, :count] = old[:, slot, :, :count]
            stores.append(store)
        self.key_store, self.value_store = stores
        self.keys[:], self.values[:] = list(self.key_store), list(self.value_store)
        state = [(r, self.length[slot], self.last_used[slot], self.tables[slot]) for slot, r in kept]
        self.owner, self.length = [None] * new_slots, [0] * new_slots
        self.last_used, self.tables, self.index = [0] * new_slots, [EMPTY] * new_slots, {}
        for new, (request, length, used, table) in enumerate(state):
            self._take(new, request)
            self.length[new], self.last_used[new], self.tables[new] = length, used, table
        self.generation += 1

    def drop_all(self) -> None:
        """No slot holds anything (the pools were cleared under them)."""
        for slot in range(self.num_slots):
            self._evict(slot)

    def place(self, decodes: list[str], others: list[str], fresh: list[str] = ()) -> None:
        """Slots for this step's rows: decodes in slots 0 .. D-1, prompts from their first token (`fresh`,
        which hold nothing yet) in D .. D+F-1, the other rows (chunks after cached tokens) above."""
        self._clock += 1
        fresh = list(fresh)
        num_decodes, top = len(decodes), len(decodes) + len(fresh)
        if top + len(others) > self.num_slots:
            self.reserve(decodes + fresh + others, max(self.capacity, 1))
        for request in fresh:  # NOTE: nothing to keep: they are placed after the others have room
            if request in self.index:
                self._evict(self.index[request])
        in_step = set(decodes) | set(others)
        decode_set = set(decodes)
        low = [s for s in range(num_decodes) if self.owner[s] not in decode_set]
        # NOTE: decodes that hold a slot above go first, swapping with a longer row of this step where
        # they must; once none is above, a spare slot above exists for every longer row moved up.
        for request in sorted(decodes, key=lambda r: r not in self.index):
            slot = self.index.get(request)
            if slot is not None and slot < num_decodes:
                continue
            target = low.pop()
            if self.owner[target] in in_step and slot is not None:
                self._swap(slot, target)
                continue
            if self.owner[target] in in_step:  # NOTE: a longer row of this step: it moves up
                self._move(target, self._spare(top, in_step))
            else:
                self._evict(target)
            if slot is not None:
                self._move(slot, target)
            else:
                self._take(target, request)
        for target, request in zip(range(num_decodes, top), fresh):
            if self.owner[target] in in_step:
                self._move(target, self._spare(top, in_step | set(fresh)))
            else:
                self._evict(target)
            self._take(target, request)
        in_step |= set(fresh)
        for request in others:  # NOTE: any of them below `top` was moved up above
            if request not in self.index:
                slot = self._spare(top, in_step)
                self._evict(slot)
                self._take(slot, request)
        for request in in_step:
            self.last_used[self.index[request]] = self._clock

    def fill(self, request: str, cached: int, block_table: np.ndarray, k_store: np.ndarray,
             v_store: np.ndarray) -> None:
        """Make the request's slot hold its first `cached` tokens; copied from the pools if it does not.

        k_store, v_store: the pools of all layers, [layers, blocks, block_size, KVH, D].

        The slot is trusted when it holds at least that many tokens *of the same blocks*: blocks a live
        request holds never change below its computed tokens, and a request id reused after a finish
        has other blocks (or prefix-cache hits of the same tokens).
        """
        slot = self.index[request]
        blocks = np.asarray(block_table[: -(-cached // self.block_size)], np.int64)
        held = self.tables[slot]
        if self.length[slot] >= cached and held.size >= blocks.size and np.array_equal(held[: blocks.size], blocks):
            self.length[slot] = cached
            return
        if cached:
            for pools, store in ((k_store, self.key_store), (v_store, self.value_store)):
                rows = pools[:, blocks].reshape(self.num_layers, -1, self.num_kv_heads, self.head_dim)[:, :cached]
                rows = rows.transpose(0, 2, 1, 3)
                store[:, slot, :, :cached] = quantize_rows(rows) if self.int8 else rows
            self.refills += 1
        self.length[slot], self.tables[slot] = cached, blocks

    def to_pools(self, slots: np.ndarray, positions: np.ndarray, targets: np.ndarray, k_store: np.ndarray,
                 v_store: np.ndarray) -> None:
        """Copy tokens' keys and values (slot slots[i], position positions[i]) into pool row targets[i]
        (block x block_size + offset) of k_store, v_store [layers, blocks, block_size, KVH, D]."""
        index = [np.ascontiguousarray(a, np.int64) for a in (slots, positions, targets)]
        plan = self._copy_plan(k_store, v_store)
        if plan is None:
            stores, pools = (self.key_store, self.value_store), (k_store, v_store)
            pool_rows = k_store.shape[1] * k_store.shape[2]
            for pool, store in zip(pools, stores):
                # NOTE: two index arrays apart put their axis first: [n, layers, KVH, D]
                rows = store[:, index[0], :, index[1], :].transpose(1, 0, 2, 3)
                pool.reshape(pool.shape[0], pool_rows, *pool.shape[3:])[:, index[2]] = (
                    dequantize_rows(rows) if self.int8 else rows)
            return
        copy, addresses, sizes = plan
        bad = copy(*addresses, *(a.ctypes.data for a in index), index[0].size, *sizes)
        if bad:
            i = bad - 1
            _, num_slots, _, capacity, pool_rows = sizes[:5]
            raise IndexError(f"token {i}: slot {index[0][i]} (of {num_slots}), position {index[1][i]} "
                             f"(capacity {capacity}) or pool row {index[2][i]} (of {pool_rows}) out of range")

    def _copy_plan(self, k_store: np.ndarray, v_store: np.ndarray) -> tuple | None:
        """lepton_slots_to_pools and its arguments but the token indices, for these stores and pools; None
        where the C copy does not apply. Worked out once per reallocation of the slots (a step of one
        decode spent more on these checks than on the copy)."""
        key = (self.generation, id(self.key_store), id(k_store), id(v_store))
        if self._plan_key == key:
            return self._plan
        copy = slots_to_pools()
        stores, pools = (self.key_store, self.value_store), (k_store, v_store)
        layers, num_slots, kv_heads, capacity, row = stores[0].shape
        head_dim = row - SCALE_BYTES if self.int8 else row
        pool_rows = k_store.shape[1] * k_store.shape[2]
        # NOTE: the C copy trusts these shapes and types (the same, float16 slots or int8 rows into float32
        # pools); anything else takes numpy's copy (which raises on a mismatch, and casts)
        widen = stores[0].dtype == np.float16 and k_store.dtype == np.float32
        dequantize = self.int8 and k_store.dtype == np.float32
        native = copy is not None and all(a.flags.c_contiguous for a in (*stores, *pools)) and (
            stores[1].dtype == stores[0].dtype and v_store.dtype == k_store.dtype) and (
            widen or dequantize or k_store.dtype == stores[0].dtype) and all(
            p.shape == (layers, *k_store.shape[1:3], kv_heads, head_dim) for p in pools) and (
            stores[1].shape == stores[0].shape)
        plan = None
        if native:
            plan = (copy, tuple(a.ctypes.data for a in (*stores, *pools)),
                    (layers, num_slots, kv_heads, capacity, pool_rows, row * stores[0].itemsize, self.copy_threads,
                     INT8_ROWS if dequantize else int(widen)))
        self._plan_key, self._plan = key, plan
        return plan

    def touch(self, slots: list[int]) -> None:
        """These slots are this step's (what place does for the rows it keeps where they are)."""
        self._clock += 1
        for slot in slots:
            self.last_used[slot] = self._clock

    def commit_next(self, slot: int, length: int, block_table: np.ndarray) -> None:
        """commit for a slot that held `length - 1` tokens of the same blocks: its table grows only when
        the new token opens a block."""
        self.length[slot] = length
        blocks = -(-length // self.block_size)
        if blocks != self.tables[slot].size:
            self.tables[slot] = np.array(block_table[:blocks], np.int64)

    def commit(self, request: str, length: int, block_table: np.ndarray) -> None:
        """After a step: the request's slot holds `length` tokens of these blocks."""
        slot = self.index[request]
        self.length[slot] = length
        self.tables[slot] = np.array(block_table[: -(-length // self.block_size)], np.int64)

    def _spare(self, above: int, in_step: set[str]) -> int:
        """A slot >= above held by no row of this step: an empty one, else the least recently used."""
        candidates = [s for s in range(above, self.num_slots) if self.owner[s] not in in_step]
        return min(candidates, key=lambda s: (self.owner[s] is not None, self.last_used[s]))

    def _take(self, slot: int, request: str) -> None:
        self.owner[slot], self.length[slot], self.tables[slot] = request, 0, EMPTY
        self.index[request] = slot

    def _evict(self, slot: int) -> None:
        if self.owner[slot] is not None:
            del self.index[self.owner[slot]]
        self.owner[slot], self.length[slot], self.tables[slot] = None, 0, EMPTY

    def _swap(self, first: int, second: int) -> None:
        """Exchange two held slots (contents and owners)."""
        count = max(self.length[first], self.length[second])
        for store in (self.key_store, self.value_store):
            held = store[:, first, :, :count].copy()
            store[:, first, :, :count] = store[:, second, :, :count]
            store[:, second, :, :count] = held
        for table in (self.owner, self.length, self.last_used, self.tables):
            table[first], table[second] = table[second], table[first]
        for slot in (first, second):
            self.index[self.owner[slot]] = slot
        self.moves += 2

    def _move(self, source: int, target: int) -> None:
        """Copy a slot's valid tokens to an empty target slot and hand it over."""
        count = self.length[source]
        for store in (self.key_store, self.value_store):
            store[:, target, :, :count] = store[:, source, :, :count]
        request = self.owner[source]
        self._evict(target)
        self._take(target, request)
        self.length[target], self.last_used[target] = count, self.last_used[source]
        self.tables[target] = self.tables[source]
        self.owner[source], self.length[source], self.tables[source] = None, 0, EMPTY
        self.moves += 1

"""SlotCache bookkeeping: where rows go, what moves keep, when a slot is trusted or refilled."""

from __future__ import annotations

import numpy as np
import pytest

from lepton.runners.slot_cache import CAPACITY_STEP, SLOT_STEP, SlotCache

LAYERS, KVH, D, BS = 2, 2, 4, 4


def cache(max_capacity: int = 1024) -> SlotCache:
    return SlotCache(LAYERS, KVH, D, np.dtype(np.float32), BS, max_capacity=max_capacity)


def mark(slots: SlotCache, request: str, value: float, length: int) -> None:
    """Write a request-specific value into its slot's first `length` positions (as a step would)."""
    slot = slots.index[request]
    for array in slots.keys + slots.values:
        array[slot, :, :length] = value
    slots.commit(request, length, np.arange(100, 100 + -(-length // BS)))


def held(slots: SlotCache, request: str, length: int) -> set[float]:
    slot = slots.index[request]
    return {float(v) for array in slots.keys + slots.values for v in np.unique(array[slot, :, :length])}


def test_decodes_take_the_lowest_slots_and_longer_rows_go_above():
    slots = cache()
    slots.reserve([], 8)
    slots.place([], ["a", "b", "c"])  # NOTE: three prompts: any slots
    for value, request in enumerate("abc", start=1):
        mark(slots, request, value, 5)
    slots.place(["c", "a"], ["b"])
    assert {slots.index["c"], slots.index["a"]} == {0, 1}
    assert slots.index["b"] >= 2
    for value, request in enumerate("abc", start=1):
        assert held(slots, request, 5) == {float(value)}, "a move lost or mixed a slot's contents"
    slots.place(["b"], ["a"])  # NOTE: b must come down to slot 0; whoever is there moves or is dropped
    assert slots.index["b"] == 0 and slots.index["a"] >= 1
    assert held(slots, "b", 5) == {2.0} and held(slots, "a", 5) == {1.0}
    assert len(set(slots.index.values())) == len(slots.index)


def test_a_decode_above_swaps_with_a_prompt_below_when_no_slot_is_spare():
    slots = cache()
    slots.reserve([], 8)
    slots.place([], ["p", "d"])
    assert (slots.index["p"], slots.index["d"]) == (0, 1)
    mark(slots, "p", 7.0, 3)
    mark(slots, "d", 9.0, 6)
    slots.place(["d"], ["p"])
    assert (slots.index["d"], slots.index["p"]) == (0, 1)
    assert held(slots, "d", 6) == {9.0} and held(slots, "p", 3) == {7.0}
    assert slots.num_slots == SLOT_STEP and slots.moves == 2


def test_a_slot_is_trusted_only_for_the_same_blocks():
    slots = cache()
    pools = np.stack([np.arange(8 * BS * KVH * D, dtype=np.float32).reshape(8, BS, KVH, D) + 1000 * i
                      for i in range(LAYERS)])  # NOTE: [layers, blocks, block_size, KVH, D]
    slots.reserve([], 16)
    slots.place(["a"], [])
    slots.fill("a", 6, np.array([3, 5]), pools, pools)
    assert slots.refills == 1
    expected = pools[1][[3, 5]].reshape(-1, KVH, D)[:6].transpose(1, 0, 2)
    np.testing.assert_array_equal(slots.keys[1][0, :, :6], expected)
    slots.commit("a", 7, np.array([3, 5]))
    slots.fill("a", 7, np.array([3, 5]), pools, pools)  # NOTE: the next decode step: trusted
    slots.fill("a", 4, np.array([3, 5]), pools, pools)  # NOTE: recomputed from an earlier token: trusted
    assert slots.refills == 1 and slots.length[0] == 4
    slots.fill("a", 6, np.array([6, 5]), pools, pools)  # NOTE: the same id over other blocks: refilled
    assert slots.refills == 2
    np.testing.assert_array_equal(slots.values[0][0, :, :4], pools[0][6].transpose(1, 0, 2))
    slots.fill("a", 0, np.array([], np.int64), pools, pools)
    assert slots.refills == 2 and slots.length[0] == 0


def test_capacity_grows_in_steps_keeping_this_steps_rows_and_stops_at_the_model_context():
    slots = cache(max_capacity=600)
    slots.reserve([], 10)
    assert slots.capacity == CAPACITY_STEP
    slots.place([], ["a", "b"])
    mark(slots, "a", 3.0, 10)
    mark(slots, "b", 4.0, 10)
    generation = slots.generation
    slots.reserve(["b"], CAPACITY_STEP + 1)  # NOTE: a quarter of headroom, rounded up to a step
    assert slots.capacity == 2 * CAPACITY_STEP and slots.generation == generation + 1
    assert slots.index == {"b": 0} and held(slots, "b", 10) == {4.0}, "only this step's rows keep a slot"
    slots.reserve(["b"], 600)
    assert slots.capacity == 600
    with pytest.raises(ValueError, match="exceeds the model's 600 positions"):
        slots.reserve(["b"], 601)


def test_arrays_shrink_after_a_burst_and_a_long_context():
    slots = cache(max_capacity=4096)
    burst = [f"r{i}" for i in range(64)]
    slots.reserve(burst, 2000)
    slots.place(burst, [])
    assert (slots.num_slots, slots.capacity) == (80, 2560)
    mark(slots, "r7", 5.0, 3)
    slots.reserve(["r7", "r9"], 300)  # NOTE: two rows of 300 tokens left: 8 x 512, not 80 x 2,560
    assert (slots.num_slots, slots.capacity) == (SLOT_STEP, 512)
    assert held(slots, "r7", 3) == {5.0} and set(slots.index) == {"r7", "r9"}
    generation = slots.generation
    slots.reserve([f"r{i}" for i in range(8)], 400)  # NOTE: within twice the need either way: kept as they are
    slots.reserve(["r7", "r9"], 200)
    assert slots.generation == generation
    slots.reserve([f"r{i}" for i in range(9)], 400)  # NOTE: one row too many: 16 slots, this step's rows kept
    assert slots.generation == generation + 1 and slots.num_slots == 16 and held(slots, "r7", 3) == {5.0}


def test_fresh_prompts_take_the_slots_right_above_the_decodes_and_chunks_go_higher():
    slots = cache()
    slots.reserve([], 8)
    slots.place([], ["c1", "c2"])
    mark(slots, "c1", 1.0, 4)
    mark(slots, "c2", 2.0, 4)
    slots.place(["c2"], ["c1"], fresh=["f1", "f2", "f3"])
    assert slots.index["c2"] == 0
    assert sorted(slots.index[f] for f in ("f1", "f2", "f3")) == [1, 2, 3], "one padded run needs them side by side"
    assert slots.index["c1"] >= 4 and held(slots, "c1", 4) == {1.0} and held(slots, "c2", 4) == {2.0}
    assert all(slots.length[slots.index[f]] == 0 for f in ("f1", "f2", "f3"))


def test_the_budget_drops_headroom_first_then_refuses_and_release_frees_everything():
    slots = cache()
    token = 2 * LAYERS * KVH * D * 4
    assert slots.token_bytes == token
    slots.max_bytes = SLOT_STEP * CAPACITY_STEP * token  # NOTE: 8 slots of 256 tokens, no more
    requests = [f"r{i}" for i in range(8)]
    assert slots.fits(8, 200) and not slots.fits(9, 200) and not slots.fits(8, 300)
    slots.reserve(requests, 200)  # NOTE: headroom would make 16 slots of 256: dropped, within the budget
    assert (slots.num_slots, slots.capacity) == (SLOT_STEP, CAPACITY_STEP) and slots.nbytes == slots.max_bytes
    with pytest.raises(ValueError, match="9 slots of 200 tokens exceed the slot budget of 262144 bytes"):
        slots.reserve(requests + ["r8"], 200)
    generation = slots.generation
    slots.release()
    assert (slots.num_slots, slots.capacity, slots.nbytes, slots.index) == (0, 0, 0, {})
    assert slots.generation == generation + 1
    slots.reserve(["r0"], 10)  # NOTE: allocates anew
    assert (slots.num_slots, slots.capacity) == (SLOT_STEP, CAPACITY_STEP)


def filled_cache() -> SlotCache:
    """Three slots whose keys and values hold distinct random numbers (seeded)."""
    slots = cache()
    slots.reserve([], 8)
    slots.place([], ["a", "b", "c"])
    rng = np.random.default_rng(0)
    for store in (slots.key_store, slots.value_store):
        store[:] = rng.standard_normal(store.shape, np.float32)
    return slots


# NOTE: a decode (slot 2, position 5), a prompt of 7 tokens over two blocks (slot 0), the last position
# of slot 1 into the last pool row
TOKENS = (np.array([2, 0, 0, 0, 0, 0, 0, 0, 1]), np.array([5, 0, 1, 2, 3, 4, 5, 6, -1]),
          np.array([13, 16, 17, 18, 19, 28, 29, 30, 39]))


@pytest.mark.parametrize("native,threads", [(True, 1), (True, 2), (True, 5), (False, 1)],
                         ids=["native-1-thread", "native-2-threads", "native-5-threads", "numpy"])
def test_to_pools_copies_each_tokens_keys_and_values_to_its_pool_row(native, threads, monkeypatch):
    from lepton.native import slots_to_pools
    from lepton.runners import slot_cache

    if native and slots_to_pools() is None:
        pytest.skip("lepton/native is not built here (no C compiler)")
    if not native:
        monkeypatch.setattr(slot_cache, "slots_to_pools", lambda: None)
    slots = filled_cache()
    slots.copy_threads = threads  # NOTE: 5 > 2 x LAYERS: one thread a (kind, layer) pair
    copy_tokens_and_check(slots)


def copy_tokens_and_check(slots: SlotCache) -> None:
    """TOKENS' keys and values into zeroed float32 pools: each token's rows in its pool row (as float32),
    nothing else written."""
    slot_ids, positions, targets = TOKENS
    positions = np.where(positions < 0, slots.capacity - 1, positions)
    pools = [np.zeros((LAYERS, 10, BS, KVH, D), np.float32) for _ in range(2)]
    slots.to_pools(slot_ids, positions, targets, *pools)
    for pool, store in zip(pools, (slots.key_store, slots.value_store)):
        rows = pool.reshape(LAYERS, 40, KVH, D)
        for slot, position, target in zip(slot_ids, positions, targets):
            np.testing.assert_array_equal(rows[:, target], store[:, slot, :, position, :].astype(np.float32))
        assert not rows[:, np.setdiff1d(np.arange(40), targets)].any()


@pytest.mark.parametrize("native", [True, False], ids=["native", "numpy"])
def test_float16_slots_are_filled_rounded_and_copied_to_float32_pools_widened(native, monkeypatch):
    from lepton.native import slots_to_pools
    from lepton.runners import slot_cache

    if native and slots_to_pools() is None:
        pytest.skip("lepton/native is not built here (no C compiler)")
    widened = []  # NOTE: the C copy's last argument, each time it is called
    real = slots_to_pools()
    monkeypatch.setattr(slot_cache, "slots_to_pools",
                        (lambda: lambda *args: widened.append(args[-1]) or real(*args)) if native else lambda: None)
    slots = SlotCache(LAYERS, KVH, D, np.dtype(np.float16), BS, max_capacity=1024)
    slots.reserve([], 8)
    slots.place([], ["a", "b", "c"])
    assert slots.key_store.dtype == np.float16 and slots.token_bytes == 2 * LAYERS * KVH * D * 2
    rng = np.random.default_rng(3)
    pools = [rng.standard_normal((LAYERS, 10, BS, KVH, D)).astype(np.float32) for _ in range(2)]
    slots.fill("a", 6, np.array([2, 7]), *pools)  # NOTE: rounded to nearest even on the way in
    for store, pool in zip((slots.key_store, slots.value_store), pools):
        rows = pool[:, [2, 7]].reshape(LAYERS, 2 * BS, KVH, D)[:, :6].transpose(0, 2, 1, 3)
        np.testing.assert_array_equal(store[:, slots.index["a"], :, :6], rows.astype(np.float16))
    for store in (slots.key_store, slots.value_store):
        store[:] = rng.standard_normal(store.shape).astype(np.float16)
    copy_tokens_and_check(slots)  # NOTE: widened exactly into the float32 pools
    assert widened == ([1] if native else [])


def test_to_pools_refuses_an_index_out_of_range_naming_the_token_and_copies_nothing():
    from lepton.native import slots_to_pools

    if slots_to_pools() is None:
        pytest.skip("lepton/native is not built here (no C compiler)")
    slots = filled_cache()
    pools = [np.zeros((LAYERS, 10, BS, KVH, D), np.float32) for _ in range(2)]
    capacity = slots.capacity
    cases = [(np.array([0, 1]), np.array([0, capacity]), np.array([0, 1]), f"token 1: slot 1 (of 8), position {capacity}"),
             (np.array([0, 8]), np.array([0, 0]), np.array([0, 1]), "token 1: slot 8 (of 8)"),
             (np.array([0, 1]), np.array([0, 0]), np.array([40, 1]), "pool row 40 (of 40) out of range")]
    for slot_ids, positions, targets, message in cases:
        with pytest.raises(IndexError, match=message.replace("(", r"\(").replace(")", r"\)")):
            slots.to_pools(slot_ids, positions, targets, *pools)
        assert not pools[0].any() and not pools[1].any()


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("threads", [1, 2])
def test_a_long_step_of_wide_rows_lands_in_its_pool_rows(dtype, threads):
    """Rows of a real head size (64: the C copy's streaming stores, widened from float16 or not) for more
    tokens than one thread copies alone (600 tokens x 2 layers x 2 kinds x 2 kv heads = 4,800 pieces), into
    shuffled pool rows: each token's rows where it goes, exactly, nothing else written."""
    from lepton.native import slots_to_pools

    if slots_to_pools() is None:
        pytest.skip("lepton/native is not built here (no C compiler)")
    dim, block_size, blocks = 64, 16, 40
    slots = SlotCache(LAYERS, KVH, dim, np.dtype(dtype), block_size, max_capacity=1024, copy_threads=threads)
    slots.reserve([], 512)
    slots.place([], ["a", "b"])
    rng = np.random.default_rng(5)
    for store in (slots.key_store, slots.value_store):
        store[:] = rng.standard_normal(store.shape).astype(dtype)
    slot_ids = np.repeat([slots.index["a"], slots.index["b"]], 300)
    positions = np.tile(np.arange(300), 2)
    targets = rng.permutation(blocks * block_size)[:600]
    pools = [np.zeros((LAYERS, blocks, block_size, KVH, dim), np.float32) for _ in range(2)]
    slots.to_pools(slot_ids, positions, targets, *pools)
    for pool, store in zip(pools, (slots.key_store, slots.value_store)):
        rows = pool.reshape(LAYERS, blocks * block_size, KVH, dim)
        np.testing.assert_array_equal(rows[:, targets], store[:, slot_ids, :, positions, :].transpose(1, 0, 2, 3).astype(np.float32))
        assert not rows[:, np.setdiff1d(np.arange(blocks * block_size), targets)].any()

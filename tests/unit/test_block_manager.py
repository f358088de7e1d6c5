"""Unit tests of the paged KV cache manager and its prefix cache (no model, exact block ids)."""

from __future__ import annotations

import random

import pytest

from lepton.block_manager import KVBlock, KVCacheManager, hash_block_tokens

BS = 4


def _blocks(m: KVCacheManager) -> list[KVBlock]:
    """Every block of the pool, by id (white-box access for ref count checks)."""
    return m._blocks


def _free_order(m: KVCacheManager) -> list[int]:
    """Free list from front (next taken) to back."""
    return list(m._free)


def _alloc(m: KVCacheManager, *args, **kwargs) -> list[int] | None:
    """allocate_slots, then the step's forward pass ends (its blocks become hittable)."""
    table = m.allocate_slots(*args, **kwargs)
    m.mark_computed()
    return table


def _prefill(m: KVCacheManager, seq_id: str, tokens: list[int]) -> list[int] | None:
    """Look up the prefix cache, then allocate the rest of the prompt, as the scheduler does."""
    blocks, num_hit = m.get_computed_blocks(tokens)
    return _alloc(m, seq_id, tokens, 0, len(tokens) - num_hit, blocks)


def _decode(m: KVCacheManager, seq_id: str, tokens: list[int]) -> list[int] | None:
    """One decode step: the last token of tokens is the one computed now."""
    return _alloc(m, seq_id, tokens, len(tokens) - 1, 1)


def _chain(tokens: list[int], num_blocks: int) -> list[int]:
    """Expected chain hashes of the first num_blocks full blocks of tokens."""
    hashes: list[int] = []
    for i in range(num_blocks):
        hashes.append(hash_block_tokens(hashes[-1] if hashes else None, tokens[i * BS : (i + 1) * BS]))
    return hashes


def _check_invariants(m: KVCacheManager) -> None:
    """Free list holds exactly the unreferenced blocks; cache entries point at their own hash."""
    free = set(_free_order(m))
    for block in _blocks(m):
        assert block.ref_cnt >= 0
        assert (block.ref_cnt == 0) == (block.block_id in free)
        if block.block_hash is not None:
            assert m._cache[block.block_hash] is block
    for h, block in m._cache.items():
        assert block.block_hash == h
    assert m.num_free_blocks + m.num_used_blocks == m.num_blocks


def test_first_allocations_take_ids_in_order() -> None:
    m = KVCacheManager(num_blocks=10, block_size=BS)
    assert _alloc(m, "a", list(range(10)), 0, 10) == [0, 1, 2]
    assert _alloc(m, "b", list(range(100, 105)), 0, 5) == [3, 4]
    assert m.get_block_table("a") == [0, 1, 2]
    assert m.get_block_table("b") == [3, 4]
    assert m.get_block_table("unknown") == []
    assert m.num_free_blocks == 5
    assert m.num_used_blocks == 5
    assert m.usage == 0.5
    assert m.can_allocate(5) and not m.can_allocate(6)
    assert _free_order(m) == [5, 6, 7, 8, 9]


def test_decode_grows_table_only_at_block_boundaries() -> None:
    m = KVCacheManager(num_blocks=8, block_size=BS)
    tokens = [10, 11, 12, 13]
    assert _alloc(m, "a", tokens, 0, 4) == [0]
    expected_tables = {5: [0, 1], 6: [0, 1], 7: [0, 1], 8: [0, 1], 9: [0, 1, 2]}
    for n in range(5, 10):
        tokens.append(10 + n)
        assert _decode(m, "a", tokens) == expected_tables[n]
    assert m.num_free_blocks == 5


def test_blocks_are_registered_exactly_when_full() -> None:
    m = KVCacheManager(num_blocks=8, block_size=BS)
    tokens = [1, 2, 3]
    _alloc(m, "a", tokens, 0, 3)
    block0 = _blocks(m)[0]
    assert block0.block_hash is None
    tokens.append(4)
    _decode(m, "a", tokens)
    assert block0.block_hash == _chain(tokens, 1)[0]
    for t in (5, 6, 7):
        tokens.append(t)
        _decode(m, "a", tokens)
    assert _blocks(m)[1].block_hash is None
    tokens.append(8)
    _decode(m, "a", tokens)
    assert [b.block_hash for b in _blocks(m)[:2]] == _chain(tokens, 2)
    assert set(m._cache) == set(_chain(tokens, 2))


def test_free_appends_tail_first_and_pins_next_allocation_order() -> None:
    m = KVCacheManager(num_blocks=10, block_size=BS)
    _alloc(m, "a", list(range(10)), 0, 10)
    _alloc(m, "b", list(range(100, 105)), 0, 5)
    m.free("a")
    assert _free_order(m) == [5, 6, 7, 8, 9, 2, 1, 0]
    m.free("b")
    assert _free_order(m) == [5, 6, 7, 8, 9, 2, 1, 0, 4, 3]
    assert m.num_free_blocks == 10 and m.num_used_blocks == 0 and m.usage == 0.0
    tokens = list(range(1000, 1040))
    assert _alloc(m, "c", tokens, 0, 40) == [5, 6, 7, 8, 9, 2, 1, 0, 4, 3]


def test_free_is_idempotent() -> None:
    m = KVCacheManager(num_blocks=4, block_size=BS)
    _alloc(m, "a", list(range(6)), 0, 6)
    m.free("a")
    m.free("a")
    m.free("never-seen")
    assert m.num_free_blocks == 4
    assert all(b.ref_cnt == 0 for b in _blocks(m))


def test_prefix_hit_reuses_cached_blocks_and_counts_tokens() -> None:
    m = KVCacheManager(num_blocks=10, block_size=BS)
    a = list(range(14))  # 3 full blocks + 2 tokens
    assert _prefill(m, "a", a) == [0, 1, 2, 3]
    m.free("a")
    assert _free_order(m) == [4, 5, 6, 7, 8, 9, 3, 2, 1, 0]
    b = list(range(8)) + [100, 101, 102, 103, 104, 105]
    blocks, num_tokens = m.get_computed_blocks(b)
    assert [blk.block_id for blk in blocks] == [0, 1]
    assert num_tokens == 2 * BS
    assert m.prefix_cache_queries == 14  # NOTE: statistics count admissions, not lookups
    assert _alloc(m, "b", b, 0, len(b) - num_tokens, blocks) == [0, 1, 4, 5]
    assert m.prefix_cache_queries == 28
    assert m.prefix_cache_hits == 8
    assert m.prefix_cache_hit_rate == pytest.approx(8 / 28)
    assert _free_order(m) == [6, 7, 8, 9, 3, 2]
    assert [blk.ref_cnt for blk in blocks] == [1, 1]
    assert _blocks(m)[2].block_hash == _chain(a, 3)[2]  # a's third block stays cached
    assert _blocks(m)[4].block_hash == _chain(b, 3)[2]  # b's own third block is registered
    _check_invariants(m)


def test_get_computed_blocks_is_read_only() -> None:
    m = KVCacheManager(num_blocks=6, block_size=BS)
    tokens = list(range(9))
    _prefill(m, "a", tokens)
    m.free("a")
    before = _free_order(m)
    blocks, _ = m.get_computed_blocks(tokens)
    assert [b.block_id for b in blocks] == [0, 1]
    assert _free_order(m) == before
    assert all(b.ref_cnt == 0 for b in blocks)


def test_never_returns_all_tokens() -> None:
    m = KVCacheManager(num_blocks=8, block_size=BS)
    prompt = list(range(8))  # exactly 2 full blocks
    _prefill(m, "a", prompt)
    m.free("a")
    blocks, num_tokens = m.get_computed_blocks(prompt)
    assert [b.block_id for b in blocks] == [0]
    assert num_tokens == BS
    blocks, num_tokens = m.get_computed_blocks(prompt + [99])
    assert [b.block_id for b in blocks] == [0, 1]
    assert num_tokens == 2 * BS
    assert m.get_computed_blocks([]) == ([], 0)
    assert m.get_computed_blocks([0]) == ([], 0)
    assert m.prefix_cache_queries == 8 and m.prefix_cache_hits == 0  # lookups alone count nothing


def test_lazy_lru_eviction_takes_least_recently_freed_first() -> None:
    m = KVCacheManager(num_blocks=4, block_size=BS)
    a = list(range(8))
    b = list(range(100, 108))
    _prefill(m, "a", a)
    m.free("a")
    assert m.num_free_blocks == 4  # cached blocks stay allocatable
    assert _prefill(m, "b", b) == [2, 3]
    m.free("b")
    assert _free_order(m) == [1, 0, 3, 2]
    assert len(m._cache) == 4
    # one new block: a's tail block (1) is the least recently freed, so it is evicted
    assert _alloc(m, "c", [200, 201, 202], 0, 3) == [1]
    assert _blocks(m)[1].block_hash is None
    assert [blk.block_id for blk in m.get_computed_blocks(a + [9])[0]] == [0]
    assert [blk.block_id for blk in m.get_computed_blocks(b + [9])[0]] == [2, 3]
    # next new block evicts a's head block; a now misses entirely
    assert _alloc(m, "d", [300], 0, 1) == [0]
    assert m.get_computed_blocks(a + [9]) == ([], 0)
    assert len(m._cache) == 2
    _check_invariants(m)


def test_touching_shared_blocks_counts_references() -> None:
    m = KVCacheManager(num_blocks=4, block_size=BS)
    prompt = list(range(9))
    assert _prefill(m, "a", prompt) == [0, 1, 2]
    m.free("a")
    assert _free_order(m) == [3, 2, 1, 0]
    assert _prefill(m, "b", prompt) == [0, 1, 3]
    assert m.num_free_blocks == 1
    assert _prefill(m, "c", prompt) == [0, 1, 2]
    assert m.num_free_blocks == 0
    assert [b.ref_cnt for b in _blocks(m)] == [2, 2, 1, 1]
    m.free("b")
    assert [b.ref_cnt for b in _blocks(m)] == [1, 1, 1, 0]
    assert _free_order(m) == [3]
    assert m.num_used_blocks == 3
    m.free("c")
    assert _free_order(m) == [3, 2, 1, 0]
    assert all(b.ref_cnt == 0 for b in _blocks(m))
    _check_invariants(m)


def test_out_of_blocks_returns_none_and_changes_nothing() -> None:
    m = KVCacheManager(num_blocks=3, block_size=BS)
    assert _alloc(m, "a", list(range(8)), 0, 8) == [0, 1]
    assert _alloc(m, "b", list(range(50, 59)), 0, 9) is None
    assert m.get_block_table("b") == []
    assert m.num_free_blocks == 1
    assert _alloc(m, "b", list(range(50, 54)), 0, 4) == [2]
    # decode of a needs a third block: none left
    tokens = list(range(8)) + [8]
    assert _decode(m, "a", tokens) is None
    assert m.get_block_table("a") == [0, 1]
    m.free("b")
    assert _decode(m, "a", tokens) == [0, 1, 2]


def test_out_of_blocks_does_not_touch_computed_blocks() -> None:
    m = KVCacheManager(num_blocks=3, block_size=BS)
    prompt = list(range(9))
    _prefill(m, "a", prompt)
    m.free("a")
    assert _alloc(m, "x", [100, 101, 102, 103], 0, 4) == [2]
    assert _free_order(m) == [1, 0]
    longer = prompt[:8] + [20, 21, 22, 23, 24]  # 2 cached blocks + 2 new ones needed
    blocks, num_tokens = m.get_computed_blocks(longer)
    assert [b.block_id for b in blocks] == [0, 1]
    assert _alloc(m, "b", longer, 0, len(longer) - num_tokens, blocks) is None
    assert _free_order(m) == [1, 0]
    assert [b.ref_cnt for b in blocks] == [0, 0]
    assert m.get_block_table("b") == []
    assert [b.block_id for b in m.get_computed_blocks(longer)[0]] == [0, 1]
    _check_invariants(m)


def test_prefix_caching_disabled_has_no_hits_and_no_hashes() -> None:
    m = KVCacheManager(num_blocks=6, block_size=BS, enable_prefix_caching=False)
    prompt = list(range(9))
    assert _prefill(m, "a", prompt) == [0, 1, 2]
    m.free("a")
    assert m.get_computed_blocks(prompt) == ([], 0)
    assert _prefill(m, "b", prompt) == [3, 4, 5]
    assert all(b.block_hash is None for b in _blocks(m))
    assert m._cache == {}
    assert m.prefix_cache_queries == 0 and m.prefix_cache_hits == 0
    assert m.prefix_cache_hit_rate == 0.0


def test_duplicate_content_concurrent_sequences_keep_cache_consistent() -> None:
    m = KVCacheManager(num_blocks=8, block_size=BS)
    prompt = list(range(9))
    assert m.get_computed_blocks(prompt) == ([], 0)
    assert m.get_computed_blocks(prompt) == ([], 0)
    assert _alloc(m, "a", prompt, 0, 9) == [0, 1, 2]
    b_tokens = list(prompt)
    assert _alloc(m, "b", b_tokens, 0, 9) == [3, 4, 5]
    hashes = _chain(prompt, 2)
    assert [b.block_hash for b in _blocks(m)[:6]] == [hashes[0], hashes[1], None, None, None, None]
    m.free("a")
    for t in (50, 51, 52):  # b fills its third block; its parent is the content hash of b's block 4
        b_tokens.append(t)
        _decode(m, "b", b_tokens)
    assert _blocks(m)[5].block_hash == _chain(b_tokens, 3)[2]
    assert [b.block_id for b in m.get_computed_blocks(b_tokens + [53])[0]] == [0, 1, 5]
    m.free("b")
    assert _free_order(m) == [6, 7, 2, 1, 0, 5, 4, 3]
    assert _alloc(m, "d", list(range(100, 112)), 0, 12) == [6, 7, 2]
    assert [b.block_id for b in m.get_computed_blocks(b_tokens + [53])[0]] == [0, 1, 5]
    assert _alloc(m, "e", list(range(200, 208)), 0, 8) == [1, 0]
    assert m.get_computed_blocks(b_tokens + [53]) == ([], 0)
    _check_invariants(m)
    m.free("d")
    m.free("e")
    assert m.num_free_blocks == 8


def test_storm_of_random_sequences_returns_every_block() -> None:
    rng = random.Random(1234)
    m = KVCacheManager(num_blocks=48, block_size=BS)
    prefixes = [[rng.randrange(1000) for _ in range(rng.randrange(1, 14))] for _ in range(4)]
    live: dict[str, list[int]] = {}
    next_id = 0
    for _ in range(2000):
        action = rng.random()
        if action < 0.3 or not live:
            tokens = rng.choice(prefixes) + [rng.randrange(1000) for _ in range(rng.randrange(1, 9))]
            seq_id = f"s{next_id}"
            next_id += 1
            if _prefill(m, seq_id, tokens) is not None:
                live[seq_id] = tokens
        elif action < 0.8:
            seq_id = rng.choice(sorted(live))
            tokens = live[seq_id] + [rng.randrange(1000)]
            if _decode(m, seq_id, tokens) is not None:
                live[seq_id] = tokens
        else:
            seq_id = rng.choice(sorted(live))
            m.free(seq_id)
            del live[seq_id]
        _check_invariants(m)
        _check_live_contents(m, live)
    assert next_id > 100 and m.prefix_cache_hits > 0
    for seq_id in rng.sample(sorted(live), len(live)):
        m.free(seq_id)
    assert m.num_free_blocks == m.num_blocks
    assert all(b.ref_cnt == 0 for b in _blocks(m))
    _check_invariants(m)


def _check_live_contents(m: KVCacheManager, live: dict[str, list[int]]) -> None:
    """Each live block's cached hash matches that sequence's own content; ref counts add up."""
    refs = [0] * m.num_blocks
    for seq_id, tokens in live.items():
        table = m.get_block_table(seq_id)
        assert len(table) == -(-len(tokens) // BS)
        hashes = _chain(tokens, len(tokens) // BS)
        for i, block_id in enumerate(table):
            refs[block_id] += 1
            block_hash = _blocks(m)[block_id].block_hash
            assert block_hash is None or block_hash == hashes[i]
    assert refs == [b.ref_cnt for b in _blocks(m)]


def test_reset_prefix_cache_only_when_nothing_is_used() -> None:
    m = KVCacheManager(num_blocks=4, block_size=BS)
    prompt = list(range(9))
    _prefill(m, "a", prompt)
    assert m.reset_prefix_cache() is False
    assert len(m._cache) == 2
    m.free("a")
    assert m.reset_prefix_cache() is True
    assert m._cache == {}
    assert all(b.block_hash is None for b in _blocks(m))
    assert m.get_computed_blocks(prompt) == ([], 0)
    assert m.num_free_blocks == 4


@pytest.mark.parametrize(
    ("num_blocks", "block_size", "name"), [(0, 4, "num_blocks"), (4, 0, "block_size"), (-1, 16, "num_blocks")]
)
def test_constructor_validation(num_blocks: int, block_size: int, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        KVCacheManager(num_blocks=num_blocks, block_size=block_size)


def test_allocate_slots_rejects_programming_errors() -> None:
    m = KVCacheManager(num_blocks=8, block_size=BS)
    prompt = list(range(9))
    with pytest.raises(ValueError, match="num_new_tokens"):
        _alloc(m, "a", prompt, 0, -1)
    with pytest.raises(ValueError, match="num_computed_tokens"):
        _alloc(m, "a", prompt, 3, 1)
    with pytest.raises(ValueError, match="token_ids"):
        _alloc(m, "a", prompt, 0, 10)
    _alloc(m, "a", prompt, 0, 9)
    with pytest.raises(ValueError, match="num_computed_tokens"):
        _alloc(m, "a", prompt + [9], 8, 1)
    blocks, _ = m.get_computed_blocks(prompt)
    with pytest.raises(ValueError, match="new_computed_blocks"):
        _alloc(m, "a", prompt + [9], 9, 0, blocks)
    assert m.get_block_table("a") == [0, 1, 2]


def test_allocate_slots_rejects_stale_computed_blocks() -> None:
    m = KVCacheManager(num_blocks=2, block_size=BS)
    prompt = list(range(5))
    _prefill(m, "a", prompt)
    m.free("a")
    blocks, num_tokens = m.get_computed_blocks(prompt)
    assert [b.block_id for b in blocks] == [0]
    _alloc(m, "x", [100, 101, 102, 103, 104], 0, 5)  # evicts block 0 and reuses it
    with pytest.raises(ValueError, match="new_computed_blocks"):
        _alloc(m, "b", prompt, 0, len(prompt) - num_tokens, blocks)
    assert m.get_block_table("b") == []


def test_blocks_computed_this_step_are_not_hit_until_marked_computed() -> None:
    m = KVCacheManager(num_blocks=10, block_size=BS)
    tokens = list(range(9))
    m.allocate_slots("a", tokens, 0, 9)
    # NOTE: a's two full blocks are registered but their K/V are written only after the step.
    assert m.get_computed_blocks(tokens) == ([], 0)
    assert m.pending_prefix(tokens, 0)
    m.mark_computed()
    blocks, num = m.get_computed_blocks(tokens)
    assert [b.block_id for b in blocks] == [0, 1] and num == 8
    assert not m.pending_prefix(tokens, 8)

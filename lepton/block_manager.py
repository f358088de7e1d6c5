"""Paged KV cache manager: block allocation, ref counting and prefix caching (after vLLM v1)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(eq=False)
class KVBlock:
    """One fixed-size page of KV cache slots."""

    block_id: int
    ref_cnt: int = 0
    block_hash: int | None = None  # set once the block is full and registered in the prefix cache


@dataclass
class _SeqState:
    """What one sequence holds: its blocks, its token count and the chain hashes of its full blocks."""

    blocks: list[KVBlock] = field(default_factory=list)
    num_tokens: int = 0  # tokens whose slots are allocated
    # NOTE: content hashes of every full block, registered or not; a private duplicate block
    # still gives its content hash as parent to the next block, so the chain stays content-based.
    block_hashes: list[int] = field(default_factory=list)


def hash_block_tokens(parent_hash: int | None, block_token_ids: Sequence[int]) -> int:
    """Chain hash of one full block: its tokens and the hash of the block before it."""
    return hash((parent_hash, tuple(block_token_ids)))


class KVCacheManager:
    """Hands out KV cache blocks to sequences and shares full blocks through a prefix cache."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks: must be >= 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size: must be >= 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._blocks = [KVBlock(i) for i in range(num_blocks)]
        # NOTE: a block is on the free list iff its ref_cnt is 0; front = next to be taken (LRU).
        # Free blocks may still carry a block_hash: they stay in the cache until taken (lazy eviction).
        self._free: OrderedDict[int, KVBlock] = OrderedDict((b.block_id, b) for b in self._blocks)
        # NOTE: cache[h].block_hash == h for every entry, and every hashed block is an entry.
        self._cache: dict[int, KVBlock] = {}
        self._seqs: dict[str, _SeqState] = {}
        # NOTE: blocks registered in the cache during the current step: their K/V are written only
        # when the step's forward pass ends, so no other sequence may read them before mark_computed().
        self._pending: set[int] = set()
        self.prefix_cache_queries = 0  # tokens looked up in the prefix cache
        self.prefix_cache_hits = 0  # tokens found in the prefix cache

    @property
    def num_free_blocks(self) -> int:
        """Blocks allocatable now, including cached blocks no sequence references."""
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        """Blocks referenced by at least one sequence."""
        return self.num_blocks - len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by at least one sequence."""
        return self.num_used_blocks / self.num_blocks

    @property
    def prefix_cache_hit_rate(self) -> float:
        """Hit tokens over queried tokens since start; 0.0 before any query."""
        if self.prefix_cache_queries == 0:
            return 0.0
        return self.prefix_cache_hits / self.prefix_cache_queries

    def get_computed_blocks(self, token_ids: Sequence[int]) -> tuple[list[KVBlock], int]:
        """Longest cached prefix of full blocks, leaving at least the last token to compute (read-only)."""
        if not self.enable_prefix_caching:
            return [], 0
        bs = self.block_size
        max_blocks = max(0, (len(token_ids) - 1) // bs)
        blocks: list[KVBlock] = []
        parent: int | None = None
        for i in range(max_blocks):
            parent = hash_block_tokens(parent, token_ids[i * bs : (i + 1) * bs])
            block = self._cache.get(parent)
            if block is None or block.block_id in self._pending:
                break
            blocks.append(block)
        return blocks, len(blocks) * bs

    def pending_prefix(self, token_ids: Sequence[int], num_cached_tokens: int) -> bool:
        """Whether the block after the cached prefix is being computed by another sequence this step."""
        bs = self.block_size
        index = num_cached_tokens // bs
        if not self.enable_prefix_caching or (index + 1) * bs > len(token_ids) - 1:
            return False
        parent: int | None = None
        for i in range(index + 1):
            parent = hash_block_tokens(parent, token_ids[i * bs : (i + 1) * bs])
        block = self._cache.get(parent)
        return block is not None and block.block_id in self._pending

    def mark_computed(self) -> None:
        """The step's forward pass wrote its K/V: blocks registered during it become hittable."""
        self._pending.clear()

    def forget_pending(self, seq_id: str) -> None:
        """seq_id's step failed: its blocks registered this step hold no K/V, so they leave the cache."""
        seq = self._seqs.get(seq_id)
        for block in seq.blocks if seq is not None else ():
            if block.block_id in self._pending:
                self._uncache(block)

    def discard_pending(self) -> None:
        """The whole step failed: every block registered during it leaves the cache."""
        for block_id in list(self._pending):
            self._uncache(self._blocks[block_id])

    def _uncache(self, block: KVBlock) -> None:
        # NOTE: the sequence keeps the block (and its chain hashes); only lookups can no longer hit it.
        if block.block_hash is not None and self._cache.get(block.block_hash) is block:
            del self._cache[block.block_hash]
        block.block_hash = None
        self._pending.discard(block.block_id)

    def can_allocate(self, num_blocks: int) -> bool:
        """Whether num_blocks new blocks can be taken from the free list now."""
        return num_blocks <= len(self._free)

    def allocate_slots(
        self,
        seq_id: str,
        token_ids: Sequence[int],
        num_computed_tokens: int,
        num_new_tokens: int,
        new_computed_blocks: Sequence[KVBlock] = (),
    ) -> list[int] | None:
        """Grow seq_id's blocks to cover the new tokens; None (and no change) if blocks run out."""
        seq = self._seqs.get(seq_id)
        is_new = seq is None
        if is_new:
            seq = _SeqState()
        total = self._check_allocate(seq, token_ids, num_computed_tokens, num_new_tokens, new_computed_blocks)
        hashes = self._extend_hashes(seq, token_ids, total)
        self._check_computed_blocks(hashes, new_computed_blocks)
        num_needed = -(-total // self.block_size) - len(seq.blocks) - len(new_computed_blocks)
        num_touched_free = sum(1 for b in new_computed_blocks if b.ref_cnt == 0)
        if num_needed > len(self._free) - num_touched_free:
            return None
        # NOTE: nothing is mutated above this line; touch before taking so touched blocks are never evicted.
        for block in new_computed_blocks:
            self._touch(block)
        seq.blocks.extend(new_computed_blocks)
        for _ in range(max(0, num_needed)):
            seq.blocks.append(self._take_free_block())
        seq.num_tokens = total
        if is_new and self.enable_prefix_caching:
            # NOTE: counted once per admitted sequence, not per lookup (a deferred lookup repeats)
            self.prefix_cache_queries += len(token_ids)
            self.prefix_cache_hits += len(new_computed_blocks) * self.block_size
        self._register_full_blocks(seq, hashes)
        self._seqs[seq_id] = seq
        return [b.block_id for b in seq.blocks]

    def free(self, seq_id: str) -> None:
        """Release seq_id's blocks tail first; freed blocks go to the end of the free list."""
        seq = self._seqs.pop(seq_id, None)
        if seq is None:
            return
        for block in reversed(seq.blocks):
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self._free[block.block_id] = block

    def get_block_table(self, seq_id: str) -> list[int]:
        """Block ids held by seq_id in order; empty for an unknown sequence."""
        seq = self._seqs.get(seq_id)
        return [] if seq is None else [b.block_id for b in seq.blocks]

    def reset_prefix_cache(self) -> bool:
        """Drop every prefix cache entry if no block is in use; returns whether it did."""
        if self.num_used_blocks > 0:
            return False
        for block in self._cache.values():
            block.block_hash = None
        self._cache.clear()
        return True

    def _check_allocate(
        self,
        seq: _SeqState,
        token_ids: Sequence[int],
        num_computed_tokens: int,
        num_new_tokens: int,
        new_computed_blocks: Sequence[KVBlock],
    ) -> int:
        """Validate allocate_slots arguments against the sequence; returns its new token count."""
        if num_new_tokens < 0:
            raise ValueError(f"num_new_tokens: must be >= 0, got {num_new_tokens}")
        if num_computed_tokens != seq.num_tokens:
            raise ValueError(
                f"num_computed_tokens: sequence holds {seq.num_tokens} tokens, got {num_computed_tokens}"
            )
        if new_computed_blocks and seq.blocks:
            raise ValueError("new_computed_blocks: only allowed for a sequence that holds no blocks")
        if new_computed_blocks and not self.enable_prefix_caching:
            raise ValueError("new_computed_blocks: prefix caching is disabled")
        if len({b.block_id for b in new_computed_blocks}) != len(new_computed_blocks):
            raise ValueError("new_computed_blocks: a block appears twice")
        total = num_computed_tokens + len(new_computed_blocks) * self.block_size + num_new_tokens
        if total > len(token_ids):
            raise ValueError(f"token_ids: {len(token_ids)} tokens known, {total} slots requested")
        return total

    def _extend_hashes(self, seq: _SeqState, token_ids: Sequence[int], total: int) -> list[int]:
        """Chain hashes of seq's full blocks once it holds total tokens (seq is not modified)."""
        hashes = list(seq.block_hashes)
        if not self.enable_prefix_caching:
            return hashes
        bs = self.block_size
        for i in range(len(hashes), total // bs):
            parent = hashes[-1] if hashes else None
            hashes.append(hash_block_tokens(parent, token_ids[i * bs : (i + 1) * bs]))
        return hashes

    def _check_computed_blocks(self, hashes: list[int], new_computed_blocks: Sequence[KVBlock]) -> None:
        """Reject computed blocks evicted or reused since get_computed_blocks returned them."""
        for i, block in enumerate(new_computed_blocks):
            if block.block_hash != hashes[i]:
                raise ValueError(
                    f"new_computed_blocks: block {block.block_id} no longer caches block {i} of the sequence"
                )

    def _touch(self, block: KVBlock) -> None:
        """Take a reference on a cached block, pulling it off the free list if it was there."""
        if block.ref_cnt == 0:
            del self._free[block.block_id]
        block.ref_cnt += 1

    def _take_free_block(self) -> KVBlock:
        """Pop the least recently freed block, evicting its prefix cache entry if any."""
        _, block = self._free.popitem(last=False)
        if block.block_hash is not None:
            del self._cache[block.block_hash]
            block.block_hash = None
        block.ref_cnt = 1
        return block

    def _register_full_blocks(self, seq: _SeqState, hashes: list[int]) -> None:
        """Record the new chain hashes and put newly full blocks in the prefix cache."""
        for i in range(len(seq.block_hashes), len(hashes)):
            block = seq.blocks[i]
            if block.block_hash is None and hashes[i] not in self._cache:
                block.block_hash = hashes[i]
                self._cache[hashes[i]] = block
                self._pending.add(block.block_id)
        seq.block_hashes = hashes

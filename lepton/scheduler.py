"""Iteration-level (continuous) batching over a paged KV cache, with chunked prefill and preemption."""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

from lepton.block_manager import KVCacheManager
from lepton.config import SchedulerConfig
from lepton.errors import ServerBusy
from lepton.sequence import FinishReason, Sequence, SequenceStatus


@dataclass(frozen=True)
class ScheduledSeq:
    """One sequence's share of a step."""

    seq: Sequence
    num_computed_tokens: int  # tokens already in the KV cache before this step
    num_new_tokens: int  # tokens this step computes, starting at num_computed_tokens
    block_table: list[int]
    sample: bool  # this step reaches the end of the known tokens, so a token is sampled


@dataclass(frozen=True)
class SchedulerOutput:
    """What the runner computes in one step."""

    scheduled: list[ScheduledSeq]
    num_batched_tokens: int
    preempted: list[Sequence] = field(default_factory=list)  # sent back to waiting this step

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    """Chooses, every step, which tokens of which sequences to compute within the token budget."""

    def __init__(self, config: SchedulerConfig, kv_cache: KVCacheManager) -> None:
        self.config = config
        self.kv_cache = kv_cache
        self.waiting: list[tuple[tuple[int, int], Sequence]] = []  # heap by Sequence.sort_key
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        """Queue a new sequence; a full queue refuses it at once."""
        # NOTE: sequences that the next step can admit (free running seats) do not count as queued,
        # so a burst of arrivals is not refused while seats are free.
        free_seats = max(0, self.config.max_num_seqs - len(self.running))
        if len(self.waiting) >= self.config.max_queue_size + free_seats:
            raise ServerBusy(
                f"server busy: {len(self.waiting)} requests waiting "
                f"(max_queue_size {self.config.max_queue_size}, {len(self.running)} running); retry later"
            )
        self._push_waiting(seq)

    def _push_waiting(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        key = seq.sort_key() if self.config.policy == "priority" else (0, seq.arrival_order)
        heapq.heappush(self.waiting, (key, seq))

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """Mark finished, drop from the queues and free its blocks at once."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting = [item for item in self.waiting if item[1] is not seq]
            heapq.heapify(self.waiting)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        self.kv_cache.free(seq.request_id)

    def schedule(self) -> SchedulerOutput:
        """Running sequences first (decodes and unfinished prefills), then admit waiting ones."""
        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledSeq] = []
        preempted: list[Sequence] = []
        for seq in sorted(self.running, key=self._order):
            if budget == 0 or seq not in self.running:
                continue
            num_new = self._num_new_tokens(seq, seq.num_computed_tokens, budget)
            if num_new == 0:
                continue
            table = self._allocate_or_preempt(seq, num_new, preempted)
            if table is None:
                continue
            scheduled.append(self._scheduled(seq, seq.num_computed_tokens, num_new, table))
            budget -= num_new
        if not preempted:
            budget = self._admit_waiting(budget, scheduled)
        return SchedulerOutput(
            scheduled, self.config.max_num_batched_tokens - budget, preempted
        )

    def _admit_waiting(self, budget: int, scheduled: list[ScheduledSeq]) -> int:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0][1]
            cached_blocks, num_cached = self.kv_cache.get_computed_blocks(seq.all_token_ids)
            if self.kv_cache.pending_prefix(seq.all_token_ids, num_cached):
                break  # NOTE: its next blocks are computed this very step; admit it next step, as hits
            num_new = self._num_new_tokens(seq, num_cached, budget)
            if num_new == 0:
                break
            table = self.kv_cache.allocate_slots(
                seq.request_id, seq.all_token_ids, 0, num_new, cached_blocks
            )
            if table is None:
                break  # NOTE: strict FCFS: a head that does not fit blocks the queue behind it
            heapq.heappop(self.waiting)
            seq.status = SequenceStatus.RUNNING
            seq.num_computed_tokens = num_cached
            if seq.num_output_tokens == 0:
                seq.num_cached_tokens = num_cached
            self.running.append(seq)
            scheduled.append(self._scheduled(seq, num_cached, num_new, table))
            budget -= num_new
        return budget

    def _num_new_tokens(self, seq: Sequence, num_computed: int, budget: int) -> int:
        remaining = seq.num_tokens - num_computed
        if remaining <= budget:
            return remaining
        return budget if self.config.enable_chunked_prefill else 0

    def _allocate_or_preempt(self, seq: Sequence, num_new: int, preempted: list[Sequence]):
        """Allocate slots, preempting the lowest-priority newest running sequences if needed."""
        while True:
            table = self.kv_cache.allocate_slots(
                seq.request_id, seq.all_token_ids, seq.num_computed_tokens, num_new
            )
            if table is not None:
                return table
            victim = max(self.running, key=self._order)
            self._preempt(victim)
            preempted.append(victim)
            if victim is seq:
                return None

    def _preempt(self, seq: Sequence) -> None:
        # NOTE: preemption by recompute: blocks are freed (they stay in the prefix cache while
        # unclaimed), and on resumption prompt + generated tokens are prefilled again.
        self.running.remove(seq)
        self.kv_cache.free(seq.request_id)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self._push_waiting(seq)

    def _order(self, seq: Sequence) -> tuple[int, int]:
        return seq.sort_key() if self.config.policy == "priority" else (0, seq.arrival_order)

    @staticmethod
    def _scheduled(seq: Sequence, num_computed: int, num_new: int, table: list[int]) -> ScheduledSeq:
        sample = num_computed + num_new == seq.num_tokens
        return ScheduledSeq(seq, num_computed, num_new, list(table), sample)

    def update(self, output: SchedulerOutput, sampled: dict[str, int]) -> None:
        """After the step: advance computed counts and append the sampled tokens."""
        self.kv_cache.mark_computed()
        for item in output.scheduled:
            seq = item.seq
            if seq.status is not SequenceStatus.RUNNING:
                continue  # aborted while the step ran
            seq.num_computed_tokens = item.num_computed_tokens + item.num_new_tokens
            if item.sample:
                seq.output_token_ids.append(sampled[seq.request_id])

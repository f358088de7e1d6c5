"""Scheduler decisions pinned for scripted arrivals (no model: tokens are made up)."""

from __future__ import annotations

import pytest

from lepton.block_manager import KVCacheManager
from lepton.config import SchedulerConfig
from lepton.errors import ServerBusy
from lepton.sampling_params import SamplingParams
from lepton.scheduler import Scheduler
from lepton.sequence import FinishReason, Sequence, SequenceStatus

BS = 4  # block size


def make(num_blocks=32, prefix=True, **cfg) -> Scheduler:
    config = SchedulerConfig(**{"max_num_batched_tokens": 8, "max_num_seqs": 4, "max_queue_size": 8, **cfg})
    return Scheduler(config, KVCacheManager(num_blocks, BS, prefix))


def seq(rid: str, n: int, start: int = 100, priority: int = 0, max_tokens: int = 16) -> Sequence:
    return Sequence(rid, list(range(start, start + n)), SamplingParams(max_tokens=max_tokens, priority=priority), 1000)


def step(s: Scheduler, token: int = 7):
    """One schedule + update; returns [(request_id, num_computed_before, num_new, sample)]."""
    out = s.schedule()
    s.update(out, {it.seq.request_id: token for it in out.scheduled if it.sample})
    return [(it.seq.request_id, it.num_computed_tokens, it.num_new_tokens, it.sample) for it in out.scheduled]


def test_chunked_prefill_mixes_with_decodes_under_the_token_budget():
    s = make()
    s.add(seq("a", 6))
    s.add(seq("b", 10, start=200))
    assert step(s) == [("a", 0, 6, True), ("b", 0, 2, False)]
    assert step(s) == [("a", 6, 1, True), ("b", 2, 7, False)]
    assert step(s) == [("a", 7, 1, True), ("b", 9, 1, True)]
    assert step(s) == [("a", 8, 1, True), ("b", 10, 1, True)]


def test_without_chunked_prefill_a_long_prompt_waits_for_a_whole_budget():
    s = make(enable_chunked_prefill=False)
    s.add(seq("a", 6))
    s.add(seq("b", 5, start=200))
    assert step(s) == [("a", 0, 6, True)]  # b (5 tokens) does not fit the 2 left
    assert step(s) == [("a", 6, 1, True), ("b", 0, 5, True)]


def test_max_num_seqs_bounds_running():
    s = make(max_num_seqs=2, max_num_batched_tokens=64)
    for i in range(3):
        s.add(seq(f"r{i}", 3, start=10 * i))
    assert [r[0] for r in step(s)] == ["r0", "r1"]
    assert s.num_waiting == 1
    s.finish(s.running[0], FinishReason.STOP)
    assert [r[0] for r in step(s)] == ["r1", "r2"]


def test_full_queue_is_busy_at_once():
    s = make(max_queue_size=2, max_num_seqs=3, max_num_batched_tokens=64)
    for i in range(5):  # 3 free seats + 2 queue places
        s.add(seq(f"r{i}", 3, start=10 * i))
    with pytest.raises(ServerBusy, match="server busy"):
        s.add(seq("late", 3))
    step(s)  # 3 admitted, 2 wait: the queue is full
    with pytest.raises(ServerBusy, match="2 requests waiting"):
        s.add(seq("late", 3))
    s.finish(s.running[0], FinishReason.STOP)
    s.add(seq("late", 3))  # a seat freed up


def test_preemption_recomputes_newest_first_and_resumes():
    # 4 blocks of 4 tokens: two sequences of 6 tokens take 2 blocks each; growth forces preemption.
    s = make(num_blocks=4, max_num_batched_tokens=16, prefix=False)
    s.add(seq("old", 6))
    s.add(seq("new", 6, start=200))
    assert step(s) == [("old", 0, 6, True), ("new", 0, 6, True)]
    assert step(s) == [("old", 6, 1, True), ("new", 6, 1, True)]
    assert step(s) == [("old", 7, 1, True), ("new", 7, 1, True)]
    # both now hold 8 tokens in 2 full blocks; the next token needs a third block each
    out = s.schedule()
    assert [p.request_id for p in out.preempted] == ["new"]
    assert [(it.seq.request_id, it.num_computed_tokens, it.num_new_tokens) for it in out.scheduled] == [("old", 8, 1)]
    new = out.preempted[0]
    assert new.status is SequenceStatus.WAITING and new.num_computed_tokens == 0 and new.num_preemptions == 1
    s.update(out, {"old": 7})
    s.finish(s.running[0], FinishReason.STOP)
    # resumed: prompt + the 3 generated tokens are prefilled again, then it samples
    assert step(s) == [("new", 0, 9, True)]
    assert new.output_token_ids == [7, 7, 7, 7]


def test_priority_policy_admits_lower_value_first_and_preempts_the_highest():
    s = make(policy="priority", max_num_batched_tokens=64)
    s.add(seq("low", 3, priority=5))
    s.add(seq("high", 3, start=50, priority=-1))
    assert [r[0] for r in step(s)] == ["high", "low"]


def test_prefix_cache_hit_skips_computed_blocks():
    s = make(max_num_batched_tokens=64)
    s.add(seq("a", 10))
    step(s)
    s.finish(s.running[0], FinishReason.STOP)
    s.add(seq("b", 10))  # same prompt: 2 full blocks (8 tokens) cached, the last 2 computed
    assert step(s) == [("b", 8, 2, True)]
    assert s.running[0].num_cached_tokens == 8


def test_finish_frees_blocks_and_abort_of_waiting_leaves_the_queue():
    s = make()
    a, b = seq("a", 6), seq("b", 6, start=300)
    s.add(a)
    s.add(b)
    s.schedule()
    s.finish(a, FinishReason.CANCELLED)
    s.finish(b, FinishReason.CANCELLED)
    assert s.kv_cache.num_used_blocks == 0 and not s.has_unfinished()

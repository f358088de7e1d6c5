"""A step that mixes prefill chunks with decodes gives what its parts give apart (OnnxRunner)."""

from __future__ import annotations

import numpy as np
import pytest

from lepton.batch import build_model_input
from lepton.config import CacheConfig, EngineConfig, RunnerConfig
from lepton.runners.onnx_runner import OnnxRunner, split_by_query_len
from lepton.sampling_params import SamplingParams
from lepton.scheduler import ScheduledSeq, SchedulerOutput
from lepton.sequence import Sequence

BLOCK_SIZE = 8
# NOTE: the parts and the mixed step run the same graph on the same rows; only the number of rows in
# each matrix product differs, which may change float32 summation order (seen: bit-identical).
ATOL = 1e-4
DECODE_CONTEXTS = {"d0": 9, "d1": 17, "d2": 3, "d3": 12}  # cached tokens before the decode step
PREFILLS = {"p0": (20, 11), "p1": (6, 6)}  # prompt tokens, tokens of this step's chunk


class Steps:
    """Sequences with fixed block tables (shuffled ids), turned into the engine's ModelInputs."""

    def __init__(self, vocab_size: int, num_blocks: int) -> None:
        rng = np.random.default_rng(0)
        sizes = {name: n + 1 for name, n in DECODE_CONTEXTS.items()} | {n: p for n, (p, _) in PREFILLS.items()}
        self.seqs = {name: Sequence(name, rng.integers(5, vocab_size, n).tolist(), SamplingParams(), 1 << 20)
                     for name, n in sizes.items()}
        free = [int(b) for b in rng.permutation(num_blocks)]
        self.tables = {name: [free.pop() for _ in range(-(-n // BLOCK_SIZE))] for name, n in sizes.items()}

    def batch(self, rows: list[tuple[str, int, int, bool]]):
        """rows: (sequence, cached tokens, new tokens, sampled) in scheduled order."""
        items = [ScheduledSeq(self.seqs[name], first, num_new, self.tables[name], sample)
                 for name, first, num_new, sample in rows]
        return build_model_input(SchedulerOutput(items, sum(r[2] for r in rows)), BLOCK_SIZE)


def decode_rows():
    return [(name, n, 1, True) for name, n in DECODE_CONTEXTS.items()]


def prefill_rows():
    return [(name, 0, chunk, chunk == prompt) for name, (prompt, chunk) in PREFILLS.items()]


def fresh_runner(export_dir, steps: Steps | None = None) -> tuple[OnnxRunner, Steps]:
    """A runner whose pools hold the decoding sequences' cached tokens."""
    config = EngineConfig(model_dir=export_dir, cache=CacheConfig(block_size=BLOCK_SIZE, kv_cache_memory_bytes=2 << 20),
                          runner=RunnerConfig(runner="onnxruntime"))
    runner = OnnxRunner(export_dir, config)
    steps = steps or Steps(runner.model_config.vocab_size, runner.num_blocks)
    runner.execute(steps.batch([(name, 0, n, False) for name, n in DECODE_CONTEXTS.items()]))
    return runner, steps


def by_request(batch, logits) -> dict[str, np.ndarray]:
    return dict(zip(batch.sample_request_ids, np.asarray(logits)))


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_mixed_step_equals_its_parts_apart(tiny_exports, exporter):
    export_dir, _ = tiny_exports("llama", exporter)
    mixed_runner, steps = fresh_runner(export_dir)
    apart_runner, _ = fresh_runner(export_dir, steps)
    padded_runner, _ = fresh_runner(export_dir, steps)
    # NOTE: prefill rows between decode rows, so the split must put logits back in scheduled order.
    decodes, prefills = decode_rows(), prefill_rows()
    mixed = steps.batch(decodes[:1] + prefills[:1] + decodes[1:] + prefills[1:])
    mixed_logits = by_request(mixed, mixed_runner.execute(mixed))
    apart_logits = {}
    for rows in (decodes, prefills):
        part = steps.batch(rows)
        apart_logits |= by_request(part, apart_runner.execute(part))
    padded_logits = by_request(mixed, padded_runner.run(mixed)[0])  # NOTE: one graph run, decodes padded
    assert list(mixed_logits) == ["d0", "d1", "d2", "d3", "p1"]
    for name, row in mixed_logits.items():
        assert np.abs(row - apart_logits[name]).max() <= ATOL, name
        assert np.abs(row - padded_logits[name]).max() <= ATOL, name
    for pools in ("k_pools", "v_pools"):
        for got, want in zip(getattr(mixed_runner, pools), getattr(apart_runner, pools)):
            assert np.abs(got - want).max() <= ATOL


def test_split_keeps_rows_tokens_and_logits_order():
    steps = Steps(vocab_size=100, num_blocks=32)
    decodes, prefills = decode_rows(), prefill_rows()
    batch = steps.batch(prefills[:1] + decodes[:2] + prefills[1:] + decodes[2:])
    (decode_part, decode_rows_), (prefill_part, prefill_rows_) = split_by_query_len(batch, BLOCK_SIZE)
    assert decode_part.sample_request_ids == ("d0", "d1", "d2", "d3")
    assert prefill_part.sample_request_ids == ("p1",)  # NOTE: p0's chunk is partial and samples nothing
    assert batch.sample_request_ids == ("d0", "d1", "p1", "d2", "d3")
    assert decode_rows_.tolist() == [0, 1, 3, 4] and prefill_rows_.tolist() == [2]
    assert decode_part.token_index.shape == (4, 1) and prefill_part.token_index.shape == (2, 11)
    assert np.array_equal(np.sort(np.concatenate([decode_part.slot_mapping, prefill_part.slot_mapping])),
                          np.sort(batch.slot_mapping))
    expected = steps.batch(decodes)
    for name in ("input_ids", "positions", "slot_mapping", "token_index", "context_lens", "logits_indices"):
        assert np.array_equal(getattr(decode_part, name), getattr(expected, name)), name
    # NOTE: each part's block tables are as wide as its own longest context needs.
    assert decode_part.block_tables.shape[1] == -(-max(n + 1 for n in DECODE_CONTEXTS.values()) // BLOCK_SIZE)
    assert prefill_part.block_tables.shape[1] == 2


def test_one_kind_of_row_is_one_graph_run():
    steps = Steps(vocab_size=100, num_blocks=32)
    for rows in (decode_rows(), prefill_rows()):
        batch = steps.batch(rows)
        [(part, logits_rows)] = split_by_query_len(batch, BLOCK_SIZE)
        assert part is batch and logits_rows.tolist() == list(range(len(batch.logits_indices)))

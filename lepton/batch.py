"""The runner's input for one step, built from the scheduler's decisions (numpy, no torch)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lepton.scheduler import ScheduledSeq, SchedulerOutput


@dataclass(frozen=True)
class AttentionGroup:
    """Sequences whose queries are padded to one length together (decodes apart from prefills)."""

    token_index: np.ndarray  # [S_g, Q_g] flat token of (sequence, slot); padding repeats the last token
    token_slot: np.ndarray  # [T_g] index of each of the group's tokens in the padded [S_g * Q_g] layout
    block_tables: np.ndarray  # [S_g, B_g]
    tokens: np.ndarray  # [T_g] the flat tokens the group computes, ascending


@dataclass(frozen=True)
class ModelInput:
    """Flat tokens of all scheduled sequences plus the indices the paged step graph needs.

    S = scheduled sequences, T = tokens this step, Q = most tokens of one sequence this step,
    B = longest block table. All int64.
    """

    input_ids: np.ndarray  # [T] token ids, sequence after sequence
    positions: np.ndarray  # [T] position of each token in its sequence
    token_index: np.ndarray  # [S, Q] flat token of (sequence, slot); padding repeats the last token
    token_slot: np.ndarray  # [T] index of each token in the padded [S * Q] layout
    query_lens: np.ndarray  # [S] tokens of each sequence in this step
    context_lens: np.ndarray  # [S] tokens in the cache after this step (past + this step)
    block_tables: np.ndarray  # [S, B] block ids, padded with 0 (masked)
    slot_mapping: np.ndarray  # [T] pool slot (block * block_size + offset) each new K/V goes to
    logits_indices: np.ndarray  # [L] flat tokens whose logits are sampled, in scheduled order
    sample_request_ids: tuple[str, ...]  # [L] the request each logits row belongs to
    # NOTE: the single padded layout above is the exported graph's contract; runners that can run
    # several attention calls use these groups so that decodes are not padded to a prefill chunk.
    groups: tuple[AttentionGroup, ...] = ()
    request_ids: tuple[str, ...] = ()  # [S] the request of each scheduled sequence (the slot runner's key)
    # NOTE: the sampler reads only each row's argmax (SamplingParams.argmax_only): a runner may return logits
    # exact only at the top candidates (lepton/runners/draft_head.py)
    argmax_only: bool = False

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])


def build_model_input(output: SchedulerOutput, block_size: int) -> ModelInput:
    """Lay out the step's tokens and index tensors from the scheduled sequences."""
    items = output.scheduled
    if all(it.num_new_tokens == 1 for it in items):
        return _decodes_input(items, block_size)
    return _general_input(items, block_size)


def _general_input(items: list[ScheduledSeq], block_size: int) -> ModelInput:
    """build_model_input for any step."""
    query_lens = np.array([it.num_new_tokens for it in items], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(query_lens)[:-1]]).astype(np.int64)
    max_blocks = max(len(it.block_table) for it in items)
    input_ids, positions, slots, tables = [], [], [], np.zeros((len(items), max_blocks), np.int64)
    for row, it in enumerate(items):
        first, last = it.num_computed_tokens, it.num_computed_tokens + it.num_new_tokens
        input_ids.append(it.seq.all_token_ids[first:last])
        pos = np.arange(first, last, dtype=np.int64)
        positions.append(pos)
        table = np.asarray(it.block_table, dtype=np.int64)
        tables[row, : len(table)] = table
        slots.append(table[pos // block_size] * block_size + pos % block_size)
    token_index, token_slot = _padded_layout(starts, query_lens)
    sampled = [row for row, it in enumerate(items) if it.sample]
    return ModelInput(
        input_ids=np.concatenate([np.asarray(ids, np.int64) for ids in input_ids]),
        positions=np.concatenate(positions),
        token_index=token_index,
        token_slot=token_slot,
        query_lens=query_lens,
        context_lens=np.array([it.num_computed_tokens + it.num_new_tokens for it in items], np.int64),
        block_tables=tables,
        slot_mapping=np.concatenate(slots),
        logits_indices=(starts + query_lens - 1)[sampled],
        sample_request_ids=tuple(items[row].seq.request_id for row in sampled),
        groups=_groups(starts, query_lens, tables, [len(it.block_table) for it in items]),
        request_ids=tuple(it.seq.request_id for it in items),
        argmax_only=_argmax_only(items, sampled),
    )


def _decodes_input(items: list[ScheduledSeq], block_size: int) -> ModelInput:
    """build_model_input for a step of decodes alone (one token each), the same arrays in fewer numpy calls
    (a step of a few decodes spends more in Python than in some of its graph's nodes)."""
    count = len(items)
    positions = np.fromiter((it.num_computed_tokens for it in items), np.int64, count)
    input_ids = np.fromiter((_token_at(it.seq, it.num_computed_tokens) for it in items), np.int64, count)
    width = max(len(it.block_table) for it in items)
    tables = np.zeros((count, width), np.int64)
    for row, it in enumerate(items):
        tables[row, : len(it.block_table)] = it.block_table
    rows = np.arange(count, dtype=np.int64)  # NOTE: each field gets an array of its own, as the general path's
    sampled = [row for row, it in enumerate(items) if it.sample]
    group = AttentionGroup(rows[:, None].copy(), rows.copy(), tables.copy(), rows.copy())
    return ModelInput(
        input_ids=input_ids,
        positions=positions,
        token_index=rows[:, None].copy(),
        token_slot=rows.copy(),
        query_lens=np.ones(count, np.int64),
        context_lens=positions + 1,
        block_tables=tables,
        slot_mapping=tables[rows, positions // block_size] * block_size + positions % block_size,
        logits_indices=rows[sampled],
        sample_request_ids=tuple(items[row].seq.request_id for row in sampled),
        groups=(group,),
        request_ids=tuple(it.seq.request_id for it in items),
        argmax_only=_argmax_only(items, sampled),
    )


def _argmax_only(items: list[ScheduledSeq], sampled: list[int]) -> bool:
    """Whether the sampler reads only the argmax of every row of logits this step returns (a step that samples
    nothing is not: whoever asks for its logits then, as the quality tools do, reads them all)."""
    return bool(sampled) and all(items[row].seq.params.argmax_only(len(items[row].seq.output_token_ids))
                                 for row in sampled)


def _token_at(seq, position: int) -> int:
    """The sequence's token at position (without building prompt + output as one list)."""
    prompt = seq.prompt_token_ids
    return prompt[position] if position < len(prompt) else seq.output_token_ids[position - len(prompt)]


def _padded_layout(starts: np.ndarray, query_lens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """token_index [S, Q] and token_slot [T] of sequences padded to the longest query."""
    max_q = int(query_lens.max())
    offsets = np.minimum(np.arange(max_q, dtype=np.int64)[None, :], query_lens[:, None] - 1)
    token_slot = np.concatenate([row * max_q + np.arange(n, dtype=np.int64) for row, n in enumerate(query_lens)])
    return starts[:, None] + offsets, token_slot


def _groups(starts, query_lens, tables, table_lens) -> tuple[AttentionGroup, ...]:
    """Decode rows (one query token) in one group, the other rows in another."""
    groups = []
    for rows in (np.flatnonzero(query_lens == 1), np.flatnonzero(query_lens > 1)):
        if rows.size == 0:
            continue
        token_index, token_slot = _padded_layout(starts[rows], query_lens[rows])
        tokens = np.concatenate([np.arange(starts[r], starts[r] + query_lens[r]) for r in rows])
        width = max(table_lens[r] for r in rows)
        groups.append(AttentionGroup(token_index, token_slot, tables[rows, :width], tokens.astype(np.int64)))
    return tuple(groups)

"""Batched token sampling: min_tokens masking, penalties, greedy, temperature, top-k/top-p/min-p."""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from lepton.sampling_params import MAX_SEED, SamplingParams

# NOTE: temperatures below this are clamped so that (logit - max) / T stays finite in float32.
MIN_TEMPERATURE = 1e-6
# NOTE: cumulative mass within this of top_p counts as having reached it (float32 rounding).
TOP_P_EPS = 1e-6


@dataclass
class SamplingInput:
    """One row of the batch, built by the engine at each step."""

    params: SamplingParams
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]
    generator: torch.Generator | None = None  # per request; None when greedy
    eos_token_ids: frozenset[int] = frozenset()  # the model's eos ids
    # NOTE: eos + stop ids within the vocab, sorted, built once per request by the engine; None
    # means "derive from eos_token_ids and params.stop_token_ids" (each step, for direct callers).
    banned_token_ids: Sequence[int] | None = None


@dataclass
class SamplerOutput:
    """One sampled token per row and, for rows that asked, its logprob and the top-n logprobs."""

    token_ids: list[int]
    # NOTE: per row None, or [(sampled_id, logprob)] followed by the top-n [(id, logprob)], best first.
    logprobs: list[list[tuple[int, float]] | None]


def make_generator(seed: int | None) -> torch.Generator:
    """Return a CPU generator seeded with seed, or with a fresh random seed when seed is None."""
    if seed is None:
        seed = secrets.randbelow(MAX_SEED + 1)
    generator = torch.Generator(device="cpu")
    generator.manual_seed(seed)
    return generator


def sample(logits: torch.Tensor, rows: Sequence[SamplingInput]) -> SamplerOutput:
    """Pick one token per row of logits [num_rows, vocab] following each row's sampling params."""
    if logits.dim() != 2 or logits.shape[0] != len(rows):
        raise ValueError(f"logits must be [{len(rows)}, vocab], got {tuple(logits.shape)}")
    if not rows:
        return SamplerOutput(token_ids=[], logprobs=[])
    logits = process_logits(logits, rows)
    token_ids = _choose_tokens(logits, rows)
    return SamplerOutput(token_ids=token_ids.tolist(), logprobs=_logprobs(logits, token_ids, rows))


def process_logits(logits: torch.Tensor, rows: Sequence[SamplingInput]) -> torch.Tensor:
    """Upcast to float32, then apply min_tokens masking and penalties (never in place)."""
    return apply_penalties(apply_min_tokens(logits.float(), rows), rows)


def apply_min_tokens(logits: torch.Tensor, rows: Sequence[SamplingInput]) -> torch.Tensor:
    """Set eos and stop_token_ids logits to -inf in rows that have fewer than min_tokens outputs."""
    # NOTE: ignore_eos does not mask eos here; the engine simply does not stop on it.
    vocab = logits.shape[-1]
    row_idx: list[int] = []
    tok_idx: list[int] = []
    for i, row in enumerate(rows):
        if len(row.output_token_ids) >= row.params.min_tokens:
            continue
        banned = row.banned_token_ids
        if banned is None:
            banned = sorted(t for t in row.eos_token_ids.union(row.params.stop_token_ids) if 0 <= t < vocab)
        row_idx += [i] * len(banned)
        tok_idx += banned
    if not row_idx:
        return logits
    logits = logits.clone()
    rows_t = torch.tensor(row_idx, device=logits.device)
    toks_t = torch.tensor(tok_idx, device=logits.device)
    logits[rows_t, toks_t] = float("-inf")
    return logits


def apply_penalties(logits: torch.Tensor, rows: Sequence[SamplingInput]) -> torch.Tensor:
    """Apply repetition (prompt and output), frequency and presence (output) penalties, vLLM style."""
    uses = [row.params.uses_penalties for row in rows]
    if not any(uses):
        return logits  # NOTE: fast path, no count tensors are built
    vocab, device = logits.shape[-1], logits.device
    # NOTE: rows without penalties contribute no ids, their factors (1, 0, 0) leave them unchanged.
    out_counts = _token_counts([r.output_token_ids if u else () for r, u in zip(rows, uses)], vocab, device)
    prompt_counts = _token_counts(
        [r.prompt_token_ids if r.params.repetition_penalty != 1.0 else () for r in rows], vocab, device
    )
    rep = _column([r.params.repetition_penalty for r in rows], device)
    freq = _column([r.params.frequency_penalty for r in rows], device)
    pres = _column([r.params.presence_penalty for r in rows], device)
    seen = (prompt_counts > 0) | (out_counts > 0)
    logits = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
    return logits - freq * out_counts - pres * (out_counts > 0).float()


def _column(values: list[float], device: torch.device) -> torch.Tensor:
    """Return values as a float32 column [n, 1] on device."""
    return torch.tensor(values, dtype=torch.float32, device=device).unsqueeze(1)


def _token_counts(seqs: Sequence[Sequence[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """Count each id of each sequence into a float32 [len(seqs), vocab] tensor (ids out of range ignored)."""
    width = max((len(s) for s in seqs), default=0)
    counts = torch.zeros(len(seqs), vocab + 1, dtype=torch.float32, device=device)
    if width == 0:
        return counts[:, :vocab]
    # NOTE: padding and out-of-range ids go to the extra column `vocab`, dropped at the end.
    padded = [list(s) + [vocab] * (width - len(s)) for s in seqs]
    ids = torch.tensor(padded, dtype=torch.long).to(device)
    ids = torch.where((ids >= 0) & (ids < vocab), ids, vocab)
    counts.scatter_add_(1, ids, torch.ones(ids.shape, dtype=torch.float32, device=device))
    return counts[:, :vocab]


def _needs_filter(params: SamplingParams) -> bool:
    """Whether top-k, top-p or min-p cut anything for this row."""
    return params.top_k > 0 or params.top_p < 1.0 or params.min_p > 0.0


def _choose_tokens(logits: torch.Tensor, rows: Sequence[SamplingInput]) -> torch.Tensor:
    """Return the chosen token id per row as a long tensor [num_rows]."""
    token_ids = _argmax(logits)  # NOTE: the answer for greedy rows (first max on ties)
    random_rows = [i for i, row in enumerate(rows) if not row.params.greedy]
    if not random_rows:
        return token_ids  # NOTE: fast path, no softmax
    # NOTE: the sorted or unsorted path depends only on the row's own params, so a seeded row
    # samples the same token whatever else is in the batch.
    filtered = [i for i in random_rows if _needs_filter(rows[i].params)]
    plain = [i for i in random_rows if not _needs_filter(rows[i].params)]
    for group, sort in ((filtered, True), (plain, False)):
        if group:
            idx = torch.tensor(group, device=logits.device)
            token_ids[idx] = _sample_group(logits[idx], [rows[i] for i in group], sort)
    return token_ids


def _argmax(logits: torch.Tensor) -> torch.Tensor:
    """Index of each row's first maximum, as a long tensor [num_rows]."""
    if logits.device.type == "cpu" and logits.dtype == torch.float32:
        # NOTE: numpy's argmax is vectorized, torch's CPU argmax is not: over [16, 49152] logits on one
        # thread, 0.08-0.1 ms against 1.1-1.7 ms (docs/performance.md). Both return the first maximum.
        return torch.from_numpy(logits.detach().numpy().argmax(axis=-1).astype(np.int64, copy=False))
    return logits.argmax(dim=-1)


def _sample_group(logits: torch.Tensor, rows: list[SamplingInput], sort: bool) -> torch.Tensor:
    """Sample one token per row with temperature and (when sort) top-k/top-p/min-p filtering."""
    temps = _column([max(r.params.temperature, MIN_TEMPERATURE) for r in rows], logits.device)
    # NOTE: subtracting the row max first keeps tiny temperatures from overflowing.
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / temps
    order = None
    if sort:
        # NOTE: one sort for the group; stable so that ties keep vocab order, as argmax does.
        logits, order = logits.sort(dim=-1, descending=True, stable=True)
        logits = _filter_sorted(logits, [r.params for r in rows])
    pos = _inverse_cdf(logits.softmax(dim=-1), _uniforms(rows, logits.device))
    return pos if order is None else order.gather(1, pos.unsqueeze(1)).squeeze(1)


def _filter_sorted(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Mask to -inf what top-k, then top-p, then min-p drop from descending-sorted logits."""
    vocab = logits.shape[-1]
    device = logits.device
    # NOTE: kept tokens always form a prefix of the sorted row, and position 0 always survives:
    # k >= 1, its prior mass is 0, and its prob is the max so it passes min_p <= 1.
    ks = torch.tensor([p.top_k if 0 < p.top_k < vocab else vocab for p in params], device=device)
    positions = torch.arange(vocab, device=device).unsqueeze(0)
    logits = logits.masked_fill(positions >= ks.unsqueeze(1), float("-inf"))
    probs = logits.softmax(dim=-1)  # NOTE: top-p and min-p see the distribution renormalized after top-k
    # NOTE: a token is kept while the mass before it is below top_p, so the token that crosses
    # top_p is kept (vLLM). top_p == 1 means no cut at all, whatever the rounding of cumsum.
    top_p = _column([p.top_p - TOP_P_EPS if p.top_p < 1.0 else float("inf") for p in params], device)
    drop = (probs.cumsum(dim=-1) - probs) >= top_p
    min_p = _column([p.min_p for p in params], device)
    drop |= probs < min_p * probs[:, :1]
    drop[:, 0] = False  # NOTE: guards the invariant against rounding (e.g. top_p below TOP_P_EPS)
    return logits.masked_fill(drop, float("-inf"))


def _uniforms(rows: list[SamplingInput], device: torch.device) -> torch.Tensor:
    """Draw one uniform in [0, 1) per row from the row's own generator."""
    # NOTE: exactly one draw per non-greedy row per step keeps each request's stream independent
    # of the batch; a row without a generator falls back to torch's global one (not reproducible).
    draws = [torch.rand((), generator=r.generator).item() for r in rows]
    return torch.tensor(draws, dtype=torch.float32, device=device)


def _inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Return per row the first position whose cumulative prob exceeds u times the row total."""
    cdf = probs.cumsum(dim=-1)
    target = (u * cdf[:, -1]).unsqueeze(1)
    pos = torch.searchsorted(cdf, target, right=True).squeeze(1)
    # NOTE: a position found this way has prob > 0; only rounding of u * total up to the total can
    # overshoot, so clamp to the last position with positive prob.
    positions = torch.arange(probs.shape[-1], device=probs.device)
    last = torch.where(probs > 0, positions, -1).amax(dim=-1)
    return torch.minimum(pos, last)


def _logprobs(
    logits: torch.Tensor, token_ids: torch.Tensor, rows: Sequence[SamplingInput]
) -> list[list[tuple[int, float]] | None]:
    """Sampled-token and top-n logprobs for rows that asked, from log_softmax of processed logits."""
    # NOTE: logprobs are those of the distribution after min_tokens masking and penalties but
    # before temperature and top-k/top-p/min-p (vLLM's default raw logprobs, plus penalties);
    # masked tokens report -inf.
    result: list[list[tuple[int, float]] | None] = [None] * len(rows)
    wanted = [i for i, row in enumerate(rows) if row.params.logprobs is not None]
    if not wanted:
        return result
    idx = torch.tensor(wanted, device=logits.device)
    logprobs = logits[idx].log_softmax(dim=-1)
    n = min(max(rows[i].params.logprobs or 0 for i in wanted), logprobs.shape[-1])
    top_values, top_ids = logprobs.topk(n, dim=-1)
    sampled = logprobs.gather(1, token_ids[idx].unsqueeze(1)).squeeze(1)
    sampled_l, top_values_l, top_ids_l = sampled.tolist(), top_values.tolist(), top_ids.tolist()
    chosen = token_ids[idx].tolist()
    for j, i in enumerate(wanted):
        k = rows[i].params.logprobs or 0
        top = list(zip(top_ids_l[j][:k], top_values_l[j][:k]))
        result[i] = [(chosen[j], sampled_l[j])] + top
    return result

"""Per-request isolation of a step: a request whose model run or sampling fails fails alone.

The batched call is the fast path; only when it raises is the work redone one request at a time,
so that the request at fault is found and the others still get their token this step.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch

from lepton.batch import build_model_input
from lepton.sampler import SamplingInput, sample
from lepton.scheduler import SchedulerOutput

logger = logging.getLogger(__name__)


class StepError(RuntimeError):
    """The model or the sampler failed for one request (reported as an internal error)."""


def run_isolated(runner, sched: SchedulerOutput, block_size: int):
    """Run the step; returns (request ids, their logits rows [n, vocab], {request id: error})."""
    batch = build_model_input(sched, block_size)
    try:
        return list(batch.sample_request_ids), runner.execute(batch), {}
    except Exception as exc:
        if len(sched.scheduled) == 1:
            logger.exception("model step failed for %s", sched.scheduled[0].seq.request_id)
            return [], None, {sched.scheduled[0].seq.request_id: exc}
        logger.warning("model step of %d sequences failed (%s); running them one by one",
                       len(sched.scheduled), exc)
    # NOTE: rewriting the same K/V slots one sequence at a time is safe: each writes only its own.
    rids, rows, errors = [], [], {}
    for item in sched.scheduled:
        single = SchedulerOutput([item], item.num_new_tokens)
        rid = item.seq.request_id
        try:
            logits = runner.execute(build_model_input(single, block_size))
        except Exception as exc:
            logger.exception("model step failed for %s", rid)
            errors[rid] = exc
            continue
        if item.sample:
            rids.append(rid)
            rows.append(logits[0].clone())  # NOTE: a runner's transient logits are overwritten by the next run
    return rids, (torch.stack(rows) if rows else None), errors


def sample_isolated(
    logits: torch.Tensor | None, rids: list[str], rows: Sequence[SamplingInput], errors: dict
) -> tuple[dict[str, int], dict[str, list | None]]:
    """Sample each row; rows that cannot be sampled go to errors. Returns (tokens, logprobs) by id."""
    if logits is None or not rids:
        return {}, {}
    if _reads_argmax_only(logits, rows):
        try:
            return _argmax_rows(logits, rids, errors)
        except Exception as exc:
            logger.warning("taking the argmax of %d rows failed (%s); sampling them", len(rows), exc)
    # NOTE: a row's max is NaN iff the row holds a NaN; one pass, no [rows, vocab] mask (~10x isnan().any())
    bad = torch.isnan(logits.amax(dim=-1))
    if bool(bad.any()):
        keep = [i for i in range(len(rids)) if not bad[i]]
        for i in torch.nonzero(bad).flatten().tolist():
            errors[rids[i]] = StepError("the model produced NaN logits")
        rids, rows, logits = [rids[i] for i in keep], [rows[i] for i in keep], logits[keep]
        if not rids:
            return {}, {}
    # NOTE: generator states are kept so that a retry draws what the batched call would have.
    states = [row.generator.get_state() if row.generator is not None else None for row in rows]
    try:
        result = sample(logits, rows)
        return _checked(rids, result.token_ids, result.logprobs, logits.shape[-1], errors)
    except Exception as exc:
        logger.warning("sampling %d rows failed (%s); sampling them one by one", len(rows), exc)
    tokens, logprobs = [], []
    for i, (row, state) in enumerate(zip(rows, states)):
        if state is not None:
            row.generator.set_state(state)
        try:
            result = sample(logits[i : i + 1], [row])
        except Exception as exc:
            logger.exception("sampling failed for %s", rids[i])
            errors[rids[i]] = exc
            tokens.append(None)
            logprobs.append(None)
            continue
        tokens.append(result.token_ids[0])
        logprobs.append(result.logprobs[0])
    return _checked(rids, tokens, logprobs, logits.shape[-1], errors)


def _reads_argmax_only(logits: torch.Tensor, rows: Sequence[SamplingInput]) -> bool:
    """Whether every row's token is its logits' argmax and nothing else of them is read (greedy, no logprobs,
    penalties or min_tokens mask: SamplingParams.argmax_only), over float32 logits in memory."""
    return logits.dtype == torch.float32 and logits.device.type == "cpu" and all(
        row.params.argmax_only(len(row.output_token_ids)) for row in rows)


def _argmax_rows(logits: torch.Tensor, rids: list[str], errors: dict) -> tuple[dict[str, int], dict[str, None]]:
    """sample() of rows that read only the argmax, and the NaN check, in one pass over the logits: numpy's argmax
    is a row's first maximum (as the sampler's greedy pick) and the first NaN of a row that holds one.
    After a model step the logits and this code are out of cache: the max for the check, then the sampler's Python
    around its argmax, took 0.25 ms of a 7 ms one-decode step (docs/performance.md, "The step's Python after a graph
    run")."""
    values = logits.detach().numpy()
    tokens = values.argmax(axis=-1)
    picked = values[np.arange(tokens.size), tokens].tolist()
    sampled, logprobs, bad = {}, {}, []
    for rid, token, value in zip(rids, tokens.tolist(), picked):
        if value != value:  # NOTE: NaN
            bad.append(rid)
        else:
            sampled[rid], logprobs[rid] = token, None
    for rid in bad:
        errors[rid] = StepError("the model produced NaN logits")
    return sampled, logprobs


def _checked(rids, tokens, logprobs, vocab: int, errors: dict):
    sampled, lps = {}, {}
    for rid, token, lp in zip(rids, tokens, logprobs):
        if token is None:
            continue
        if not 0 <= token < vocab:
            errors[rid] = StepError(f"sampling produced token id {token} outside the vocabulary")
            continue
        sampled[rid], lps[rid] = token, lp
    return sampled, lps

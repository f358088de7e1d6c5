"""Batch invariance for the torch runner: each token's numbers independent of the tokens beside it.

CPU GEMM libraries pick their kernel by the number of rows: MKL in torch 2.13 computed a row of an
fp32 product one way alone, another way in a product of 2 or 3 rows, and a third way in any product
of 4 rows or more, whatever the row's position (tests/model/test_batch_invariance.py checks it).
So a request's logits moved (by about 1e-6) with the number of requests beside it, and its sampled
text with them now and then. In deterministic mode every product the model runs gets at least
MIN_ROWS rows, a multiple of MIN_ROWS: linear layers are padded with zero rows, and each attention
group's query slots are padded too (decodes then run the same prompt-chunk kernel as prefills, so
a token recomputed after a preemption gets the numbers it had).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

MIN_ROWS = 4


def padded_rows(num_rows: int) -> int:
    """num_rows rounded up to a multiple of MIN_ROWS (and at least MIN_ROWS)."""
    return max(MIN_ROWS, -(-num_rows // MIN_ROWS) * MIN_ROWS)


class RowPaddedLinear(nn.Linear):
    """nn.Linear whose product always has padded_rows(rows) rows: zero rows are added and dropped."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        extra = padded_rows(rows) - rows
        if extra == 0:
            return super().forward(x)
        return super().forward(F.pad(x, (0, 0, 0, extra)))[:rows]


def make_batch_invariant(model: nn.Module) -> nn.Module:
    """Replace every nn.Linear of model by a RowPaddedLinear holding the same parameters (tied ones stay tied)."""
    linears = [(parent, name, child) for parent in model.modules()
               for name, child in parent.named_children() if type(child) is nn.Linear]
    for parent, name, linear in linears:
        padded = RowPaddedLinear(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        padded.weight, padded.bias = linear.weight, linear.bias
        setattr(parent, name, padded)
    return model


def pad_queries(token_index: np.ndarray, token_slot: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """An attention group's [S, Q] query layout widened to padded_rows(Q) slots per sequence.

    The new slots repeat each sequence's last token, as the layout's own padding does (their
    outputs are dropped); token_slot is moved to the wider layout.
    """
    num_seqs, max_q = token_index.shape
    width = padded_rows(max_q)
    if width == max_q:
        return token_index, token_slot
    extra = np.repeat(token_index[:, -1:], width - max_q, axis=1)
    return np.concatenate([token_index, extra], axis=1), token_slot // max_q * width + token_slot % max_q

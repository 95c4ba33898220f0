"""The evaluation loss, defined once: the trainer's periodic evaluation and `python -m pretrain.evaluate` both
add up the same totals, so a checkpoint's val_loss is the same number wherever it is computed.

A batch's per-token losses (B, T) are summed per sequence in float64, then weighted by the sequence's weight
(1 for a real sample, 0 for the padding that gives every rank the same number of batches). The loss is the
total over all tokens of real sequences divided by their token count: a token-weighted mean, independent of
how the samples were cut into batches or dealt to ranks.
"""

from __future__ import annotations

import torch


def loss_totals(token_losses: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """[sum of token losses, tokens] of the real sequences, float64 on the CPU; token_losses (B, T), weights (B,)."""
    real = weights.double().cpu()
    per_sequence = token_losses.double().sum(dim=1).cpu()  # (B,)
    return torch.stack([(per_sequence * real).sum(), real.sum() * token_losses.shape[1]])

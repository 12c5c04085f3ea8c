"""Loss aggregation: reduce a per-token loss [B, L] under a response mask to one scalar.

The modes follow verl/DAPO naming. `token_count` / `sequence_count` let a micro-batch be normalised by
the whole mini-batch's totals, so that summing the micro-batch losses gives the mini-batch loss exactly
(the trainer passes them; by default they are this batch's own counts).
"""
from typing import Optional

import torch

LOSS_AGGREGATIONS = ("token_mean", "seq_mean_token_sum", "seq_mean_token_mean")


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` where mask is 1; 0 when the mask is empty."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1)


def aggregate_loss(per_token: torch.Tensor, mask: torch.Tensor, mode: str = "token_mean",
                   token_count: Optional[float] = None, sequence_count: Optional[float] = None) -> torch.Tensor:
    """token_mean: sum / tokens; seq_mean_token_sum: per-sequence sums averaged over sequences;
    seq_mean_token_mean: per-sequence means averaged over sequences."""
    mask = mask.to(per_token.dtype)
    masked = per_token * mask
    if mode == "token_mean":
        denominator = mask.sum() if token_count is None else token_count
        return masked.sum() / max(float(denominator), 1.0)
    sequences = per_token.shape[0] if sequence_count is None else sequence_count
    if mode == "seq_mean_token_sum":
        return masked.sum(dim=-1).sum() / max(float(sequences), 1.0)
    if mode == "seq_mean_token_mean":
        per_sequence = masked.sum(dim=-1) / mask.sum(dim=-1).clamp(min=1)
        return per_sequence.sum() / max(float(sequences), 1.0)
    raise ValueError(f"unknown loss aggregation '{mode}'; choose one of {LOSS_AGGREGATIONS}")

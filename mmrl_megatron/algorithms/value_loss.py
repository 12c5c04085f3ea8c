"""Critic loss with value clipping, and explained variance (how much of the returns the critic predicts)."""
from typing import Optional

import torch

from .aggregation import masked_mean


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                       clip: Optional[float] = 0.2) -> torch.Tensor:
    """Per-token 0.5 * max((V - R)^2, (clip(V, V_old +- clip) - R)^2); plain 0.5 (V - R)^2 when clip is None."""
    loss = (values - returns).square()
    if clip is not None:
        clipped = old_values + (values - old_values).clamp(-clip, clip)
        loss = torch.maximum(loss, (clipped - returns).square())
    return 0.5 * loss * mask.to(values.dtype)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - Var(R - V) / Var(R) over masked tokens; 1 is perfect, 0 no better than a constant."""
    residual = returns - values
    residual_variance = masked_mean((residual - masked_mean(residual, mask)).square(), mask)
    return_variance = masked_mean((returns - masked_mean(returns, mask)).square(), mask)
    return 1.0 - residual_variance / return_variance.clamp(min=1e-8)

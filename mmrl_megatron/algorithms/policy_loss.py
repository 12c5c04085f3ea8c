"""Policy-gradient losses on per-token log-probs [B, L] with a response mask.

PPO clip with asymmetric bounds (DAPO clip-higher: clip_high > clip_low) and dual clip (for negative
advantages the loss is capped at dual_clip * |A|), and GSPO, whose ratio is a per-sequence geometric
mean. Both return the per-token loss (aggregate it with aggregation.aggregate_loss) and statistics, and are
registered (registry.py) under their algorithm.policy_loss names, the clip bounds read from the config.
"""
from dataclasses import dataclass
from typing import Optional

import torch

from .aggregation import masked_mean
from .registry import register_policy_loss

LOG_RATIO_LIMIT = 20.0  # exp(20) ~ 5e8: beyond this the ratio is clipped anyway; keeps exp finite


@dataclass
class PolicyLossOutput:
    per_token_loss: torch.Tensor  # [B, L], zero outside the mask
    clip_fraction: torch.Tensor  # share of response tokens whose ratio was clipped
    approx_kl: torch.Tensor  # mean of (old - new) log-prob, a cheap policy-drift gauge
    ratio_mean: torch.Tensor


def _clipped_objective(ratio, advantages, mask, clip_low, clip_high, dual_clip):
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss = torch.maximum(unclipped, clipped)
    was_clipped = (clipped > unclipped).float()
    if dual_clip is not None:
        if dual_clip <= 1.0:
            raise ValueError(f"algorithm.dual_clip must be > 1, got {dual_clip}")
        capped = torch.minimum(loss, -advantages * dual_clip)
        loss = torch.where(advantages < 0, capped, loss)
    return loss * mask, masked_mean(was_clipped, mask)


def ppo_clip_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                  clip_low: float = 0.2, clip_high: float = 0.2, dual_clip: Optional[float] = None) -> PolicyLossOutput:
    """Token-level ratio r = exp(logp - old_logp); loss = max(-A r, -A clip(r, 1-low, 1+high))."""
    mask = mask.to(logprobs.dtype)
    log_ratio = (logprobs - old_logprobs).clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
    ratio = torch.exp(log_ratio)
    loss, clip_fraction = _clipped_objective(ratio, advantages, mask, clip_low, clip_high, dual_clip)
    return PolicyLossOutput(loss, clip_fraction.detach(), masked_mean(-log_ratio, mask).detach(),
                            masked_mean(ratio, mask).detach())


def gspo_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
              clip_low: float = 3e-4, clip_high: float = 4e-4, dual_clip: Optional[float] = None) -> PolicyLossOutput:
    """GSPO: s_i = exp(mean_t (logp - old_logp)) per sequence; the token ratio is s_i * pi_t / sg(pi_t),
    equal to s_i in value, with the gradient of the sequence mean spread over its tokens."""
    mask = mask.to(logprobs.dtype)
    log_ratio = (logprobs - old_logprobs) * mask
    sequence_log_ratio = log_ratio.sum(dim=-1, keepdim=True) / mask.sum(dim=-1, keepdim=True).clamp(min=1)
    token_log_ratio = sequence_log_ratio.detach() + logprobs - logprobs.detach()
    ratio = torch.exp(token_log_ratio.clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT))
    loss, clip_fraction = _clipped_objective(ratio, advantages, mask, clip_low, clip_high, dual_clip)
    return PolicyLossOutput(loss, clip_fraction.detach(), masked_mean(-log_ratio, mask).detach(),
                            masked_mean(ratio, mask).detach())


def _with_configured_clip(loss_fn):
    """loss_fn under the registry's signature: clip_low, clip_high and dual_clip come from the algorithm config."""
    def registered(logprobs, old_logprobs, advantages, mask, config) -> PolicyLossOutput:
        return loss_fn(logprobs, old_logprobs, advantages, mask, config.clip_low, config.clip_high, config.dual_clip)

    return registered


register_policy_loss("ppo")(_with_configured_clip(ppo_clip_loss))
register_policy_loss("gspo", sequence_level=True)(_with_configured_clip(gspo_loss))


def truncated_importance_weights(trainer_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor,
                                 cap: float) -> torch.Tensor:
    """min(pi_trainer / pi_rollout, cap) per token, detached: corrects for the rollout engine sampling
    from a slightly different distribution than the trainer's old policy (TIS)."""
    log_ratio = (trainer_logprobs - rollout_logprobs).clamp(max=LOG_RATIO_LIMIT)
    return torch.exp(log_ratio).clamp(max=cap).detach()


def entropy_bonus_loss(entropy: torch.Tensor, coefficient: float) -> torch.Tensor:
    """The per-token term added to the policy loss: -coefficient * entropy (maximises entropy)."""
    return -coefficient * entropy

"""Advantage estimators: GRPO, RLOO, REINFORCE++ (outcome rewards) and GAE (with a critic).

Sequence-level estimators take one scalar reward per response and a group size n (responses of one
prompt are contiguous: rows g*n .. g*n+n-1) and return one advantage per response. Token-level estimators
take [B, L] tensors and a response mask. The end of the file registers each under its algorithm.advantage
name (registry.py), with the signature the trainer calls.
"""
from typing import Tuple

import torch

from .aggregation import masked_mean
from .kl import kl_penalised_rewards
from .registry import AdvantageInputs, Advantages, register_advantage_estimator


def _groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be 1-D with a multiple of group_size={group_size} entries, got {tuple(rewards.shape)}")
    return rewards.view(-1, group_size)


def grpo_advantages(rewards: torch.Tensor, group_size: int, normalize_by_std: bool = True,
                    eps: float = 1e-6) -> torch.Tensor:
    """(r - group mean) / (group std + eps), or without the std division (Dr. GRPO) when told.

    The std is the unbiased sample std, as in verl; a group of one, or of equal rewards, has advantage
    exactly 0."""
    groups = _groups(rewards.float(), group_size)
    # Centre on the first reward before averaging: equal rewards then sum exactly to 0, where a plain
    # float32 mean of e.g. 2.1s is one ulp off and (r - mean) / (std + eps) gives every sample ~0.19.
    shifted = groups - groups[:, :1]
    centred = shifted - shifted.mean(dim=1, keepdim=True)
    if normalize_by_std and group_size > 1:
        std = (centred.square().sum(dim=1, keepdim=True) / (group_size - 1)).sqrt()
        # dividing would give 0/0 for equal rewards when eps is 0
        centred = torch.where(std > 0, centred / (std + eps), torch.zeros_like(centred))
    return centred.reshape(-1)


def rloo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """r_i minus the mean reward of the other n-1 responses of its prompt."""
    if group_size < 2:
        raise ValueError("RLOO needs at least 2 samples per prompt (rollout.n >= 2)")
    groups = _groups(rewards.float(), group_size)
    leave_one_out = (groups.sum(dim=1, keepdim=True) - groups) / (group_size - 1)
    return (groups - leave_one_out).reshape(-1)


def discounted_returns(token_rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """G_t = r_t + gamma * G_{t'} over each row's response tokens, t' the next unmasked position; [B, L] in,
    [B, L] out. Masked positions (padding, or tool output inside a multi-turn response) neither discount nor
    reset the return: it is carried across them unchanged, as in verl."""
    mask = mask.float()
    returns = torch.zeros_like(token_rewards, dtype=torch.float32)
    running = torch.zeros(token_rewards.shape[0], dtype=torch.float32, device=token_rewards.device)
    rewards = token_rewards.float() * mask
    for t in reversed(range(token_rewards.shape[1])):
        running = torch.where(mask[:, t] > 0, rewards[:, t] + gamma * running, running)
        returns[:, t] = running
    return returns * mask


def whiten(values: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the masked entries of the whole batch; the unbiased std, as verl's masked_whiten."""
    mean = masked_mean(values, mask)
    count = mask.float().sum()
    bessel = count / (count - 1).clamp(min=1)
    variance = masked_mean((values - mean) ** 2, mask) * bessel
    return (values - mean) * torch.rsqrt(variance + eps) * mask


def reinforce_plus_plus_advantages(token_rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """REINFORCE++: discounted returns (KL penalty already folded into token_rewards) whitened over the batch."""
    return whiten(discounted_returns(token_rewards, mask, gamma), mask)


def gae_advantages(token_rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
                   lam: float = 1.0, whiten_advantages: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over response tokens; returns (advantages, returns).

    delta_t = r_t + gamma * V_{t+1} - V_t with V past the last response token = 0;
    A_t = delta_t + gamma * lam * A_{t+1}; returns = A + V (before whitening)."""
    mask = mask.float()
    rewards, values = token_rewards.float() * mask, values.float() * mask
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros(rewards.shape[0])
    next_advantage = torch.zeros(rewards.shape[0])
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        current = delta + gamma * lam * next_advantage
        # padding positions keep the running values of the last real token
        advantages[:, t] = current * mask[:, t]
        next_value = torch.where(mask[:, t] > 0, values[:, t], next_value)
        next_advantage = torch.where(mask[:, t] > 0, current, next_advantage)
    returns = (advantages + values) * mask
    if whiten_advantages:
        advantages = whiten(advantages, mask)
    return advantages, returns


def outcome_to_token_rewards(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Place each response's scalar score on its last unmasked token (the last one the policy generated, also when
    a multi-turn mask has holes); [B] + [B, L] -> [B, L]."""
    token_rewards = torch.zeros_like(mask, dtype=torch.float32)
    present = mask > 0
    last = (present * torch.arange(1, mask.shape[1] + 1, device=mask.device)).argmax(dim=1)
    rows = torch.nonzero(present.any(dim=1)).squeeze(1)
    token_rewards[rows, last[rows]] = scores.float()[rows]
    return token_rewards


def token_rewards(inputs: AdvantageInputs) -> torch.Tensor:
    """[B, L]: each score on its response's last token, minus kl_coef * KL on every token when the trainer
    handed over the log-probs for it (algorithm.kl_in_reward, AdvantageEstimator.tensors_needed)."""
    rewards = outcome_to_token_rewards(inputs.scores, inputs.mask)
    if "ref_logprobs" not in inputs.tensors:
        return rewards
    config = inputs.config
    return kl_penalised_rewards(rewards, inputs.tensors["old_logprobs"], inputs.tensors["ref_logprobs"], inputs.mask,
                                config.kl_coef, config.kl_estimator)


@register_advantage_estimator("grpo")
def _grpo(inputs: AdvantageInputs) -> Advantages:
    per_response = grpo_advantages(inputs.scores, inputs.group_size, inputs.config.norm_adv_by_std)
    return Advantages(per_response.unsqueeze(1) * inputs.mask)


@register_advantage_estimator("rloo")
def _rloo(inputs: AdvantageInputs) -> Advantages:
    return Advantages(rloo_advantages(inputs.scores, inputs.group_size).unsqueeze(1) * inputs.mask)


@register_advantage_estimator("reinforce_plus_plus", token_rewards=True)
def _reinforce_plus_plus(inputs: AdvantageInputs) -> Advantages:
    return Advantages(reinforce_plus_plus_advantages(token_rewards(inputs), inputs.mask, inputs.config.gamma))


@register_advantage_estimator("gae", needs=("old_values",), token_rewards=True, token_level=True)
def _gae(inputs: AdvantageInputs) -> Advantages:
    config = inputs.config
    return Advantages(*gae_advantages(token_rewards(inputs), inputs.tensors["old_values"], inputs.mask, config.gamma,
                                      config.lam))

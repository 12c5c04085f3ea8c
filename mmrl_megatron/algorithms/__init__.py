"""Advantage estimators, policy and value losses, KL estimators and loss aggregation: pure tensor functions."""
from .advantages import (discounted_returns, gae_advantages, grpo_advantages, outcome_to_token_rewards,
                         reinforce_plus_plus_advantages, rloo_advantages, whiten)
from .aggregation import LOSS_AGGREGATIONS, aggregate_loss, masked_mean
from .dapo import groups_with_reward_variance, overlong_reward_penalty
from .kl import KL_ESTIMATORS, kl_penalised_rewards, kl_penalty
from .policy_loss import (PolicyLossOutput, entropy_bonus_loss, gspo_loss, ppo_clip_loss,
                          truncated_importance_weights)
from .value_loss import clipped_value_loss, explained_variance

__all__ = [
    "KL_ESTIMATORS", "LOSS_AGGREGATIONS", "PolicyLossOutput", "aggregate_loss", "clipped_value_loss",
    "discounted_returns", "entropy_bonus_loss", "explained_variance", "gae_advantages", "grpo_advantages",
    "groups_with_reward_variance", "gspo_loss", "kl_penalised_rewards", "kl_penalty", "masked_mean",
    "outcome_to_token_rewards", "overlong_reward_penalty", "ppo_clip_loss", "reinforce_plus_plus_advantages",
    "rloo_advantages", "truncated_importance_weights", "whiten",
]

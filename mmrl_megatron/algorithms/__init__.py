"""Advantage estimators, policy and value losses, KL estimators and loss aggregation: pure tensor functions,
the estimators and policy losses registered by name (registry.py)."""
from .advantages import (discounted_returns, gae_advantages, grpo_advantages, outcome_to_token_rewards,
                         reinforce_plus_plus_advantages, rloo_advantages, token_rewards, whiten)
from .aggregation import LOSS_AGGREGATIONS, aggregate_loss, masked_mean
from .dapo import groups_with_reward_variance, overlong_reward_penalty
from .kl import KL_ESTIMATORS, kl_penalised_rewards, kl_penalty
from .policy_loss import (PolicyLossOutput, entropy_bonus_loss, gspo_loss, ppo_clip_loss,
                          truncated_importance_weights)
from .registry import (ADVANTAGE_ESTIMATORS, POLICY_LOSSES, AdvantageEstimator, AdvantageInputs, Advantages,
                       PolicyLoss, advantage_estimator, import_plugins, policy_loss, register_advantage_estimator,
                       register_policy_loss)
from .value_loss import clipped_value_loss, explained_variance

__all__ = [
    "ADVANTAGE_ESTIMATORS", "AdvantageEstimator", "AdvantageInputs", "Advantages", "KL_ESTIMATORS",
    "LOSS_AGGREGATIONS", "POLICY_LOSSES", "PolicyLoss", "PolicyLossOutput", "advantage_estimator", "aggregate_loss",
    "clipped_value_loss", "discounted_returns", "entropy_bonus_loss", "explained_variance", "gae_advantages",
    "grpo_advantages", "groups_with_reward_variance", "gspo_loss", "import_plugins", "kl_penalised_rewards",
    "kl_penalty", "masked_mean", "outcome_to_token_rewards", "overlong_reward_penalty", "policy_loss",
    "ppo_clip_loss", "register_advantage_estimator", "register_policy_loss", "reinforce_plus_plus_advantages",
    "rloo_advantages", "token_rewards", "truncated_importance_weights", "whiten",
]

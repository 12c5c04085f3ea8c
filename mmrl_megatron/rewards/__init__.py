"""Rewards: boxed-answer math equivalence, a format reward, a VLM reward model, and user functions by path."""
from mmrl_megatron.rewards.boxed import extract_boxed_answer
from mmrl_megatron.rewards.builder import RewardFunction, build_reward_function
from mmrl_megatron.rewards.errors import RewardError
from mmrl_megatron.rewards.format_reward import format_score
from mmrl_megatron.rewards.math_answer import answers_equivalent
from mmrl_megatron.rewards.types import RewardItem, RewardResult

__all__ = ["RewardError", "RewardFunction", "RewardItem", "RewardResult", "answers_equivalent",
           "build_reward_function", "extract_boxed_answer", "format_score"]

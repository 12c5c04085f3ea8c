"""verl's Geometry3K reward (verl/utils/reward_score/geo3k.py): 0.9 x accuracy + 0.1 x format, at most 1.

Selected with reward.function=geo3k (and reward.format_weight=0, since the format term is already inside).
Accuracy is boxed_math's checker and format is format_reward's rule, which are stricter than verl's
mathruler grader and `<think>.*</think>.*\\boxed{.*}` regex (docs/verl_differences.md)."""
from typing import Any, Dict, Optional

from mmrl_megatron.rewards import math_answer
from mmrl_megatron.rewards.format_reward import format_score

FORMAT_SHARE = 0.1  # verl's format_score default


def compute_score(data_source: str, solution_str: str, ground_truth: Any,
                  extra_info: Optional[Dict[str, Any]] = None) -> Dict[str, float]:
    accuracy = math_answer.compute_score(data_source, solution_str, ground_truth, extra_info)["acc"]
    form = format_score(solution_str)
    return {"score": (1.0 - FORMAT_SHARE) * accuracy + FORMAT_SHARE * form, "acc": accuracy, "format": form}

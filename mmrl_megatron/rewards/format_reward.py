"""The format reward: reasoning inside <think>...</think>, then a final answer in \\boxed{}."""
import re

from mmrl_megatron.rewards.boxed import extract_boxed_answer

_THINK_THEN_ANSWER = re.compile(r"^\s*<think>(?P<thought>.*?)</think>(?P<answer>.*)$", re.DOTALL)


def format_score(response: str) -> float:
    """1.0 when the response is one non-empty <think> block followed by text holding a \\boxed{} answer."""
    match = _THINK_THEN_ANSWER.match(response)
    if not match or not match.group("thought").strip() or "<think>" in match.group("answer"):
        return 0.0
    return 1.0 if extract_boxed_answer(match.group("answer")) is not None else 0.0

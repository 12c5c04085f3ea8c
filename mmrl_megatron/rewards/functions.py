"""Find an answer-reward function by name and call it as verl does: a built-in, or "path/to/file.py:function_name"
with verl's signature compute_score(data_source, solution_str, ground_truth, extra_info) -> float | dict with
"score", called with keyword arguments; an async function is run to completion."""
import asyncio
import inspect
import math
import numbers
from typing import Any, Callable, Dict, Optional, Tuple

from mmrl_megatron.config.errors import ConfigError
from mmrl_megatron.config.plugins import load_plugin
from mmrl_megatron.rewards.errors import RewardError

BUILT_INS = {"boxed_math": "mmrl_megatron.rewards.math_answer:compute_score",
             "geo3k": "mmrl_megatron.rewards.geo3k:compute_score"}


def load_function(spec: str, key: str = "reward.function") -> Callable:
    """The callable named by `spec` (a built-in name, "module:function" or "file.py:function"); errors name the
    config `key` that gave it (evaluation metrics load their plug-ins here too)."""
    try:
        function = load_plugin(spec, key, BUILT_INS)
    except ConfigError as error:
        raise RewardError(str(error)) from error
    if not callable(function):
        raise RewardError(f"{key} {spec!r}: {spec.rpartition(':')[2]!r} is not a function")
    return function


def call_function(function: Callable, arguments: Dict[str, Any]) -> Any:
    """function(**arguments) (verl's keyword names), awaited to completion when it is async."""
    result = function(**arguments)
    return asyncio.run(result) if inspect.isawaitable(result) else result


def _number(value: Any, spec: str, what: str) -> float:
    # bool is a number here as in verl; a string is not, though float() would read "1.0"
    if not isinstance(value, numbers.Real):
        raise RewardError(f"reward.function {spec!r} returned {what} {type(value).__name__} {str(value)[:40]!r}; "
                          f"it must return a number or a dict with a numeric 'score'")
    return float(value)


def score_and_accuracy(value: Any, spec: str) -> Tuple[float, float, Dict[str, float]]:
    """(score, accuracy, other numeric fields) from a number or a verl-style dict; accuracy is the dict's "acc"
    (or "accuracy") when given, else whether the score is positive. RewardError for a result of the wrong type
    (a mistake in the function, the same for every call); ValueError for a non-finite score."""
    extras: Dict[str, float] = {}
    accuracy: Optional[Any] = None
    if isinstance(value, dict):
        if "score" not in value:
            raise RewardError(f"reward.function {spec!r} returned a dict without a 'score' key (keys: {sorted(value)})")
        extras = {key: float(item) for key, item in value.items()
                  if isinstance(item, numbers.Real) and key not in ("score", "acc", "accuracy")}
        accuracy = value.get("acc", value.get("accuracy"))
        score = _number(value["score"], spec, "a 'score' of type")
    else:
        score = _number(value, spec, "a")
    if not math.isfinite(score):  # one NaN would poison every advantage in its group
        raise ValueError(f"reward function returned a non-finite score {score}")
    accuracy = float(score > 0) if accuracy is None else _number(accuracy, spec, "an 'acc' of type")
    return score, accuracy, extras

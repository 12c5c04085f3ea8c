"""Find an answer-reward function by name: a built-in, or "path/to/file.py:function_name" with verl's signature
compute_score(data_source, solution_str, ground_truth, extra_info) -> float | dict with "score"."""
import importlib
import importlib.util
import math
import os
from typing import Any, Callable, Dict, Optional, Tuple

from mmrl_megatron.rewards.errors import RewardError

BUILT_INS = {"boxed_math": "mmrl_megatron.rewards.math_answer:compute_score"}


def load_function(spec: str) -> Callable:
    """The callable named by `spec` (a built-in name, "module:function" or "file.py:function")."""
    target = BUILT_INS.get(spec, spec)
    location, separator, name = target.rpartition(":")
    if not separator or not name:
        raise RewardError(f"reward.function {spec!r}: expected one of {sorted(BUILT_INS)} or 'path/to/file.py:function_name'")
    if location.endswith(".py"):
        if not os.path.isfile(location):
            raise RewardError(f"reward.function {spec!r}: file {location} does not exist")
        module_spec = importlib.util.spec_from_file_location(f"user_reward_{abs(hash(location))}", location)
        module = importlib.util.module_from_spec(module_spec)
        try:
            module_spec.loader.exec_module(module)
        except Exception as error:
            raise RewardError(f"reward.function {spec!r}: importing {location} failed: {error!r}") from error
    else:
        module = importlib.import_module(location)
    function = getattr(module, name, None)
    if not callable(function):
        raise RewardError(f"reward.function {spec!r}: {location} has no function {name!r}")
    return function


def score_and_accuracy(value: Any) -> Tuple[float, float, Dict[str, float]]:
    """(score, accuracy, other numeric fields) from a float or a verl-style dict; accuracy is the dict's "acc"
    (or "accuracy") when given, else whether the score is positive. A non-finite score is an error."""
    extras: Dict[str, float] = {}
    if isinstance(value, dict):
        if "score" not in value:
            raise TypeError(f"reward dict has no 'score' key (keys: {sorted(value)})")
        extras = {key: float(item) for key, item in value.items()
                  if isinstance(item, (int, float, bool)) and key not in ("score", "acc", "accuracy")}
        accuracy: Optional[Any] = value.get("acc", value.get("accuracy"))
        value = value["score"]
    else:
        accuracy = None
    score = float(value)
    if not math.isfinite(score):  # one NaN would poison every advantage in its group
        raise ValueError(f"reward function returned a non-finite score {score}")
    return score, float(accuracy) if accuracy is not None else float(score > 0), extras

"""The built-in answer reward: the last \\boxed{} answer compared with the ground truth by math-verify.

math-verify (Hugging Face's checker) does the mathematical equivalence: fractions, decimals, LaTeX forms,
`x = 3` against `3`, units in \\text{} and degree signs. Before it, answers are normalised for what
geometry ground truths carry and it does not drop (trailing plain-word units, percent signs, spaces).
"""
import re
import threading
from typing import Any, Dict, Optional

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

from mmrl_megatron.rewards.boxed import extract_boxed_answer

_UNIT_WORDS = r"(?:units?|square units|sq units|cm|mm|m|km|in|inches|ft|feet|yd|meters?|degrees?|deg)"
_TRAILING_UNITS = re.compile(rf"(?:\s*(?:\^\{{?2\}}?|\^\{{?3\}}?)?)*\s+{_UNIT_WORDS}(?:\^?\{{?[23]\}}?)?\s*$")
_DEGREE = re.compile(r"\^\s*\{?\\circ\}?|°|\\degree")


def normalize_answer(answer: str) -> str:
    """The answer without surrounding $, spaces, degree marks, percent signs and trailing unit words."""
    answer = answer.strip().strip("$").strip()
    answer = _DEGREE.sub("", answer)
    answer = _TRAILING_UNITS.sub("", answer)
    answer = answer.replace("\\%", "").replace("%", "").replace("\\!", "").replace("\\,", "")
    answer = re.sub(r"\\(?:dfrac|tfrac)", r"\\frac", answer)
    return re.sub(r"\s+", " ", answer).strip().rstrip(".")


def answers_equivalent(predicted: str, ground_truth: str) -> bool:
    """Whether two answers are mathematically equal (string-equal after normalisation, or equal to math-verify)."""
    predicted, ground_truth = normalize_answer(predicted), normalize_answer(ground_truth)
    if not predicted or not ground_truth:
        return False
    if predicted == ground_truth:
        return True
    # math-verify's own timeouts use SIGALRM, which exists only on the main thread; elsewhere the caller's
    # timeout (reward.timeout_s, enforced by the worker pool) bounds the time instead.
    seconds = 5 if threading.current_thread() is threading.main_thread() else None
    extraction = [LatexExtractionConfig(), ExprExtractionConfig()]
    gold = parse(f"${ground_truth}$", extraction_config=extraction, parsing_timeout=seconds)
    guess = parse(f"${predicted}$", extraction_config=extraction, parsing_timeout=seconds)
    return bool(gold and guess and verify(gold, guess, timeout_seconds=seconds))


def compute_score(data_source: str, solution_str: str, ground_truth: Any,
                  extra_info: Optional[Dict[str, Any]] = None) -> Dict[str, float]:
    """verl's signature: score 1.0 when the response's last \\boxed{} answer equals the ground truth, else 0.0."""
    predicted = extract_boxed_answer(solution_str)
    truth = str(ground_truth)
    truth = extract_boxed_answer(truth) or truth
    correct = predicted is not None and answers_equivalent(predicted, truth)
    return {"score": float(correct), "acc": float(correct)}

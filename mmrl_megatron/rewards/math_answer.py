"""The built-in answer reward: the last \\boxed{} answer compared with the ground truth by math-verify.

math-verify (Hugging Face's checker) does the mathematical equivalence: fractions, decimals, LaTeX forms,
`x = 3` against `3`, sets and intervals. Before it, normalize.py rewrites the forms it lacks (units in markup,
hedges between values, repeating decimals, unicode roots), and an equation written value-first is reduced to
its constant side here.
"""
import re
import threading
from typing import Any, Dict, List, Optional

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

from mmrl_megatron.rewards.boxed import extract_boxed_answer
from mmrl_megatron.rewards.normalize import normalize_answer

_EXTRACTION = [LatexExtractionConfig(), ExprExtractionConfig()]
# a quantity's name: letters with subscripts and primes, \\angle ABC, m\\angle B, \\overline{AB}
_NAME = re.compile(r"^(?:\\(?:angle|measuredangle|triangle|overline|widehat|overarc|arc)\b|[A-Za-z]"
                   r"|_\{?[A-Za-z0-9]+\}?|['{}\s])+$")


def _timeout_seconds() -> Optional[int]:
    # math-verify's own timeouts use SIGALRM, which exists only on the main thread; elsewhere the caller's
    # timeout (reward.timeout_s, enforced by the worker pool) bounds the time instead.
    return 5 if threading.current_thread() is threading.main_thread() else None


def _parse(answer: str) -> List[Any]:
    return parse(f"${answer}$", extraction_config=_EXTRACTION, parsing_timeout=_timeout_seconds())


def _constant_side(answer: str) -> str:
    """For an equation or chain whose sides are names and constants ("4 = x", "x = 3 = y", "m\\angle B = 30"),
    its last constant side; the answer unchanged otherwise ("x^2 = 4" stays an equation). math-verify takes the
    right-hand side of `x = 3` itself but reads `4 = x` as an equation that never equals 4."""
    sides = [side.strip() for side in answer.split("=")]
    if len(sides) < 2 or "," in answer or not all(sides):
        return answer
    constants = [side for side in sides if not _NAME.match(side)]
    return constants[-1] if constants and all(_is_constant(side) for side in constants) else answer


def _is_constant(answer: str) -> bool:
    parsed = _parse(answer)
    return bool(parsed) and getattr(parsed[0], "free_symbols", None) == set()


def answers_equivalent(predicted: str, ground_truth: str) -> bool:
    """Whether two answers are mathematically equal (string-equal after normalisation, or equal to math-verify)."""
    predicted, ground_truth = normalize_answer(predicted), normalize_answer(ground_truth)
    if not predicted or not ground_truth:
        return False
    if "=" not in ground_truth:
        predicted = _constant_side(predicted)
    if predicted == ground_truth:
        return True
    gold, guess = _parse(ground_truth), _parse(predicted)
    return bool(gold and guess and verify(gold, guess, timeout_seconds=_timeout_seconds()))


def compute_score(data_source: str, solution_str: str, ground_truth: Any,
                  extra_info: Optional[Dict[str, Any]] = None) -> Dict[str, float]:
    """verl's signature: score 1.0 when the response's last \\boxed{} answer equals the ground truth, else 0.0."""
    predicted = extract_boxed_answer(solution_str)
    truth = str(ground_truth)
    truth = extract_boxed_answer(truth) or truth
    correct = predicted is not None and answers_equivalent(predicted, truth)
    return {"score": float(correct), "acc": float(correct)}

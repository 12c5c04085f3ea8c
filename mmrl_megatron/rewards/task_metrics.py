"""Validation metrics per data source: the built-ins (exact_match, math_accuracy, bleu, rouge) and user plug-ins.

A metric is two functions. `per_sample` takes one response with verl's compute_score keywords (data_source,
solution_str, ground_truth, extra_info) and returns a value; `aggregate` takes the values of a data source's
whole validation set (every data-parallel rank's share) and returns the numbers reported, by name. Most
metrics are means of per-sample numbers; BLEU is a corpus statistic (n-gram counts added over the set
before the geometric mean), so its per-sample value is the (hypothesis, references) pair.

A plug-in, "path/to/file.py:function", is a per-sample function with those keywords returning a number (a
bool counts), reported as the mean under the function's name. Built-ins that read an answer take the
response's last \\boxed{} content when it has one, else the text after any <think>...</think>, and accept a
list of ground truths (any one may match; BLEU and ROUGE use them as multiple references).
"""
import difflib
import numbers
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Sequence, Tuple

from mmrl_megatron.rewards import math_answer
from mmrl_megatron.rewards.boxed import extract_boxed_answer
from mmrl_megatron.rewards.errors import RewardError
from mmrl_megatron.rewards.functions import call_function, load_function
from mmrl_megatron.rewards.vqa_normalize import normalize_vqa_answer

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")  # rouge-score's names; F-measure of each


@dataclass(frozen=True)
class TaskMetric:
    """name: the built-in's name or the plug-in function's; keys: the names `aggregate` reports
    (val/<data_source>/<key>)."""
    name: str
    keys: Tuple[str, ...]
    per_sample: Callable[..., Any]  # (data_source=, solution_str=, ground_truth=, extra_info=) -> value
    aggregate: Callable[[List[Any]], Dict[str, float]]


def final_answer(response: str) -> str:
    """The last \\boxed{} content, else the response after its last </think>, stripped."""
    after_thinking = response.rpartition("</think>")[2]
    boxed = extract_boxed_answer(after_thinking)
    return (boxed if boxed is not None else after_thinking).strip()


def references(ground_truth: Any) -> List[str]:
    """A ground truth as a list of accepted answers (a parquet list column arrives as a list)."""
    if isinstance(ground_truth, (list, tuple)):
        return [str(item) for item in ground_truth] or [""]
    return [str(ground_truth)]


def _mean(key: str) -> Callable[[List[float]], Dict[str, float]]:
    return lambda values: {key: sum(values) / len(values)}


def _exact_match(data_source, solution_str, ground_truth, extra_info) -> float:
    accepted = {normalize_vqa_answer(answer) for answer in references(ground_truth)}
    return float(normalize_vqa_answer(final_answer(solution_str)) in accepted)


def _math_accuracy(data_source, solution_str, ground_truth, extra_info) -> float:
    return math_answer.compute_score(data_source, solution_str, ground_truth, extra_info)["acc"]


def _bleu_pair(data_source, solution_str, ground_truth, extra_info) -> Tuple[str, List[str]]:
    return final_answer(solution_str), references(ground_truth)


def _corpus_bleu(pairs: List[Tuple[str, List[str]]]) -> Dict[str, float]:
    """sacrebleu's corpus BLEU (0-100, its default 13a tokenisation and exponential smoothing); samples with
    fewer references fill the missing reference streams with None, as sacrebleu allows."""
    from sacrebleu.metrics import BLEU

    width = max(len(refs) for _, refs in pairs)
    streams = [[refs[k] if k < len(refs) else None for _, refs in pairs] for k in range(width)]
    return {"bleu": BLEU().corpus_score([hypothesis for hypothesis, _ in pairs], streams).score}


def _rouge() -> TaskMetric:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)

    def per_sample(data_source, solution_str, ground_truth, extra_info) -> Dict[str, float]:
        # score_multi keeps, per type, the reference with the best F-measure
        scores = scorer.score_multi(references(ground_truth), final_answer(solution_str))
        return {kind: scores[kind].fmeasure for kind in ROUGE_TYPES}

    def aggregate(values: List[Dict[str, float]]) -> Dict[str, float]:
        return {kind: sum(value[kind] for value in values) / len(values) for kind in ROUGE_TYPES}

    return TaskMetric("rouge", ROUGE_TYPES, per_sample, aggregate)


BUILT_IN_METRICS: Dict[str, Callable[[], TaskMetric]] = {
    "exact_match": lambda: TaskMetric("exact_match", ("exact_match",), _exact_match, _mean("exact_match")),
    "math_accuracy": lambda: TaskMetric("math_accuracy", ("math_accuracy",), _math_accuracy, _mean("math_accuracy")),
    "bleu": lambda: TaskMetric("bleu", ("bleu",), _bleu_pair, _corpus_bleu),
    "rouge": _rouge,
}


def _plug_in(spec: str, key: str) -> TaskMetric:
    function = load_function(spec, key)
    name = spec.rpartition(":")[2]

    def per_sample(**arguments) -> float:
        value = call_function(function, arguments)
        # bool is a number here as in rewards; a string is a mistake in the function, the same on every call
        if not isinstance(value, numbers.Real):
            raise RewardError(f"{key} {spec!r} returned a {type(value).__name__} {str(value)[:40]!r}; a metric "
                              "function returns a number")
        return float(value)

    return TaskMetric(name, (name,), per_sample, _mean(name))


def load_metric(spec: str, key: str) -> TaskMetric:
    """A built-in by name, or a plug-in "path/to/file.py:function" (or "module:function"); RewardError naming
    `key` (the config key that gave it) when the name is unknown or the file or function is missing."""
    if spec in BUILT_IN_METRICS:
        return BUILT_IN_METRICS[spec]()
    if ":" not in spec:
        close = difflib.get_close_matches(spec, list(BUILT_IN_METRICS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise RewardError(f"{key}: unknown metric {spec!r}{hint}; give one of {sorted(BUILT_IN_METRICS)} or "
                          "'path/to/file.py:function_name'")
    return _plug_in(spec, key)


RESERVED_KEYS = ("accuracy", "reward", "response_length")  # what every data source reports without configuration


def build_task_metrics(metrics_by_source: Mapping[str, Sequence[str]], key_prefix: str) -> Dict[str, List[TaskMetric]]:
    """{data_source: its metrics} from {data_source: metric names}; RewardError naming `key_prefix`.<source> for
    an unknown name, a missing file or function, or two metrics (or a reserved name) reporting the same key."""
    built: Dict[str, List[TaskMetric]] = {}
    for source, names in metrics_by_source.items():
        key = f"{key_prefix}.{source}"
        built[source] = [load_metric(name, key) for name in names]
        reported = [(metric.name, report) for metric in built[source] for report in metric.keys]
        seen = {report: "a built-in per-source key" for report in RESERVED_KEYS}
        for name, report in reported:
            if report in seen:
                raise RewardError(f"{key}: {name!r} reports val/{source}/{report}, as {seen[report]} does; rename "
                                  "the function or list the metric once")
            seen[report] = repr(name)
    return built

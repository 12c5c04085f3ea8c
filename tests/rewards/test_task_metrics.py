"""The validation task metrics (rewards/task_metrics.py): the built-ins against their libraries' documented
behaviour and the VQA evaluation's normalisation, and plug-ins loaded by path with verl's keywords."""
import pathlib
import re
import textwrap

import pytest

from mmrl_megatron.rewards import RewardError
from mmrl_megatron.rewards.math_answer import compute_score as boxed_math
from mmrl_megatron.rewards.task_metrics import build_task_metrics, load_metric
from mmrl_megatron.rewards.vqa_normalize import normalize_vqa_answer

KEY = "evaluation.metrics.src"


def _aggregate(name, pairs):
    """The metric's report over (response, ground truth) pairs, as the evaluation calls it."""
    metric = load_metric(name, KEY)
    return metric.aggregate([metric.per_sample(data_source="src", solution_str=response, ground_truth=truth,
                                               extra_info={}) for response, truth in pairs])


def test_bleu_is_sacrebleus_corpus_bleu_over_the_whole_set():
    """Invariant: bleu reports sacrebleu's corpus BLEU of its README example (48.53 with two reference streams),
    reading answers from \\boxed{} or after </think>, and not the mean of the sentence BLEUs (100, 14.8, 29.1)."""
    first = ["The dog bit the man.", "It was not unexpected.", "The man bit him first."]
    second = ["The dog had bit the man.", "No one was surprised.", "The man had bitten the dog."]
    responses = ["The dog bit the man.", "<think>hmm</think> It wasn't surprising.",
                 "\\boxed{The man had just bitten him.}"]
    report = _aggregate("bleu", [(r, [a, b]) for r, a, b in zip(responses, first, second)])
    assert round(report["bleu"], 2) == 48.53


def test_bleu_takes_a_variable_number_of_references():
    """Invariant: samples with one and with two references are scored together (sacrebleu's None-padded
    streams), each against all of its own: when some reference of every sample is the answer, BLEU is 100;
    with the second sample's matching reference left out, it is not."""
    exact = [("a small red car", "a small red car"), ("the cat sat down here", ["a dog", "the cat sat down here"])]
    assert _aggregate("bleu", exact)["bleu"] == pytest.approx(100)
    assert _aggregate("bleu", [exact[0], (exact[1][0], ["a dog"])])["bleu"] < 50


def test_rouge_is_rouge_scores_f_measure_averaged_over_samples():
    """Invariant: rouge reports the mean F-measure of rouge-score's rouge1, rouge2 and rougeL (Porter stemmer);
    for its README pair ("jumps" stems to "jump") unigram P = 6/8, R = 6/9 and the LCS is 5 tokens, computed
    here by hand; with several references the best one counts."""
    target, prediction = "The quick brown fox jumps over the lazy dog", "The quick brown dog jumps on the log."

    def f_measure(overlap, predicted, wanted):
        precision, recall = overlap / predicted, overlap / wanted
        return 2 * precision * recall / (precision + recall)

    report = _aggregate("rouge", [(prediction, target), ("exactly this", ["something else", "exactly this"])])
    assert report["rouge1"] == pytest.approx((f_measure(6, 8, 9) + 1.0) / 2)
    assert report["rougeL"] == pytest.approx((f_measure(5, 8, 9) + 1.0) / 2)
    # bigrams: "the quick", "quick brown" (2 of 7 predicted, 8 wanted)
    assert report["rouge2"] == pytest.approx((f_measure(2, 7, 8) + 1.0) / 2)


@pytest.mark.parametrize("text, normalised", [
    ("Two dogs.", "2 dogs"), ("The 1,000 cats!", "1000 cats"), ("  Yes ", "yes"), ("red-car", "red car"),
    ("don't", "dont"), ("3.5", "3.5"), ("an apple", "apple"), ("left / right", "left right"),
])
def test_vqa_normalisation_follows_the_vqa_evaluation(text, normalised):
    """Invariant: the VQA v2 evaluation's steps: punctuation, periods not before a digit, lower case, number
    words to digits, articles removed; apostrophes dropped in place of its contraction table."""
    assert normalize_vqa_answer(text) == normalised


def test_exact_match_compares_normalised_answers():
    """Invariant: exact_match is 1 when the normalised final answer equals the normalised ground truth (or any
    of a list of them), and 0 for a different answer or an answer inside a longer sentence."""
    pairs = [("\\boxed{Two}", "2"), ("<think>count</think> The cat.", ["dog", "cat"]), ("a dog", "cat"),
             ("It is a cat", "cat")]
    assert _aggregate("exact_match", pairs)["exact_match"] == pytest.approx(2 / 4)


def test_math_accuracy_is_the_boxed_math_reward_accuracy():
    """Invariant: math_accuracy is the mean of boxed_math's (math-verify's) accuracy on the same responses."""
    pairs = [("\\boxed{0.5}", "\\frac{1}{2}"), ("so \\boxed{x = 3}", "3"), ("\\boxed{4}", "5"), ("no box 1/2", "1/2")]
    expected = sum(boxed_math("src", r, t, {})["acc"] for r, t in pairs) / len(pairs)
    assert expected == 0.5
    assert _aggregate("math_accuracy", pairs)["math_accuracy"] == expected


PLUG_INS = textwrap.dedent('''
    def words(data_source, solution_str, ground_truth, extra_info):
        return len(solution_str.split()) + (extra_info["bonus"] if data_source == "src" else 100)

    def is_long(*, data_source, solution_str, ground_truth, extra_info):
        return len(solution_str) > 3

    def text(data_source, solution_str, ground_truth, extra_info):
        return "1.0"

    def accuracy(data_source, solution_str, ground_truth, extra_info):
        return 1.0
''')


@pytest.fixture
def plug_in_file(tmp_path):
    path = tmp_path / "my_metrics.py"
    path.write_text(PLUG_INS)
    return str(path)


def test_plug_in_is_a_per_sample_function_averaged(plug_in_file):
    """Invariant: "file.py:function" is called with verl's keywords per response and reported as the mean under
    the function's name; a bool is a number."""
    metric = load_metric(f"{plug_in_file}:words", KEY)
    values = [metric.per_sample(data_source="src", solution_str=text, ground_truth="", extra_info={"bonus": 1})
              for text in ("one two", "one two three four")]
    assert metric.keys == ("words",) and metric.aggregate(values) == {"words": 4.0}
    boolean = load_metric(f"{plug_in_file}:is_long", KEY)
    assert boolean.per_sample(data_source="s", solution_str="long text", ground_truth="", extra_info={}) == 1.0


def test_plug_in_returning_a_non_number_names_the_function(plug_in_file):
    """Invariant: a metric returning a string is a RewardError naming the key and the function."""
    metric = load_metric(f"{plug_in_file}:text", KEY)
    with pytest.raises(RewardError, match=r"evaluation.metrics.src .*my_metrics.py:text.* returned a str"):
        metric.per_sample(data_source="s", solution_str="x", ground_truth="", extra_info={})


@pytest.mark.parametrize("spec, message", [
    ("bleuu", r"evaluation.metrics.src: unknown metric 'bleuu' \(did you mean 'bleu'\?\)"),
    ("missing.py:f", r"evaluation.metrics.src 'missing.py:f': file missing.py does not exist"),
    ("{file}:absent", r"has no 'absent'"),
    ("no_such_module_xyz:f", r"module no_such_module_xyz cannot be imported"),
])
def test_bad_metric_names_are_refused_with_the_key(plug_in_file, spec, message):
    """Invariant: an unknown built-in (with the closest name), a missing file, function or module is one
    RewardError naming the config key."""
    with pytest.raises(RewardError, match=message):
        build_task_metrics({"src": ["exact_match", spec.format(file=plug_in_file)]}, "evaluation.metrics")


def test_two_metrics_reporting_the_same_key_are_refused(plug_in_file):
    """Invariant: a metric listed twice, or a plug-in named like a key every source reports (accuracy), is
    refused: one would overwrite the other under val/<data_source>/<key>."""
    with pytest.raises(RewardError, match=r"reports val/src/bleu"):
        build_task_metrics({"src": ["bleu", "bleu"]}, "evaluation.metrics")
    with pytest.raises(RewardError, match=r"reports val/src/accuracy, as a built-in per-source key does"):
        build_task_metrics({"src": [f"{plug_in_file}:accuracy"]}, "evaluation.metrics")
    built = build_task_metrics({"src": ["rouge", "bleu"], "other": ["bleu"]}, "evaluation.metrics")
    assert [m.keys for m in built["src"]] == [("rouge1", "rouge2", "rougeL"), ("bleu",)]


def test_the_readme_example_metric_loads_and_scores(tmp_path):
    """Invariant: the plug-in shown in the README's "Evaluation by task" section loads by path and scores a
    response (the README stays true)."""
    readme = (pathlib.Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## Evaluation by task", 1)[1].split("\n## ", 1)[0]
    [code] = re.findall(r"```python\n(.*?)```", section, re.S)
    path = tmp_path / "keywords.py"
    path.write_text(code)
    metric = load_metric(f"{path}:keyword_recall", KEY)
    assert metric.per_sample(data_source="src", solution_str="a red bus", ground_truth="red car", extra_info={}) == 0.5

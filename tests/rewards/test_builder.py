"""build_reward_function: user functions by path with verl's signature; failures score 0, are counted, never crash."""
import textwrap

import pytest

from mmrl_megatron.config.schema import RewardConfig
from mmrl_megatron.rewards import RewardError, RewardItem, build_reward_function

USER_FUNCTIONS = textwrap.dedent('''
    import os, time

    def match(data_source, solution_str, ground_truth, extra_info):
        correct = ground_truth in solution_str
        return {"score": 2.0 if correct else -1.0, "acc": correct, "length": len(solution_str),
                "source_seen": float(data_source == "src" and extra_info.get("k") == 1)}

    def plain(data_source, solution_str, ground_truth, extra_info):
        return 0.25

    def raises(data_source, solution_str, ground_truth, extra_info):
        if "bad" in solution_str:
            raise ZeroDivisionError("user bug")
        if "nan" in solution_str:
            return float("nan")
        return 1.0

    def keyword_only(*, data_source, solution_str, ground_truth, extra_info):
        return float(solution_str == ground_truth)

    def reordered(extra_info, ground_truth, data_source, solution_str):
        return {"score": float(solution_str == ground_truth), "source": float(data_source == "src")}

    async def awaited(data_source, solution_str, ground_truth, extra_info):
        import asyncio
        await asyncio.sleep(0.01)
        return {"score": 3.0 if solution_str == ground_truth else 0.5, "acc": solution_str == ground_truth}

    def returns_text(data_source, solution_str, ground_truth, extra_info):
        return "1.0" if solution_str == "string" else 1.0

    def returns_text_score(data_source, solution_str, ground_truth, extra_info):
        return {"score": "1"}

    def misbehaves(data_source, solution_str, ground_truth, extra_info):
        if "slow" in solution_str:
            time.sleep(60)
        if "crash" in solution_str:
            os._exit(3)
        return 1.0
''')


@pytest.fixture
def user_file(tmp_path):
    path = tmp_path / "my_reward.py"
    path.write_text(USER_FUNCTIONS)
    return str(path)


def _score(spec, items, **config):
    reward = build_reward_function(RewardConfig(function=spec, num_workers=2, **config))
    try:
        return reward.score_batch(items), reward.metrics()
    finally:
        reward.close()


def test_user_function_by_path(user_file):
    """Invariant: a function given as path:name receives verl's four arguments; dict results give score,
    accuracy and extra numeric components, float results give score with accuracy = score > 0."""
    results, metrics = _score(f"{user_file}:match", [("src", "it is 7", "7", {"k": 1}), RewardItem("src", "8", "7")])
    assert [(r.score, r.accuracy, r.error) for r in results] == [(2.0, 1.0, None), (-1.0, 0.0, None)]
    assert results[0].components == {"answer": 2.0, "length": 7.0, "source_seen": 1.0}
    assert metrics == {"reward/errors_exception": 0.0, "reward/errors_timeout": 0.0, "reward/errors_reward_model": 0.0}
    results, _ = _score(f"{user_file}:plain", [("src", "x", "1", None)], format_weight=0.5)
    assert (results[0].score, results[0].accuracy, results[0].components) == (0.25, 1.0, {"answer": 0.25, "format": 0.0})


def test_user_functions_are_called_with_keywords_as_verl_does(user_file):
    """Invariant: verl's arguments arrive by keyword, so a keyword-only function works and one whose parameters
    are in another order still gets each value under its own name."""
    items = [("src", "7", "7", None), ("other", "8", "7", None)]
    results, _ = _score(f"{user_file}:keyword_only", items)
    assert [r.score for r in results] == [1.0, 0.0] and all(r.error is None for r in results)
    results, _ = _score(f"{user_file}:reordered", items)
    assert [(r.score, r.components["source"], r.error) for r in results] == [(1.0, 1.0, None), (0.0, 0.0, None)]


def test_async_user_function_runs_to_completion(user_file):
    """Invariant: an async compute_score is awaited; its dict result scores like a plain function's."""
    results, metrics = _score(f"{user_file}:awaited", [("s", "7", "7", None), ("s", "8", "7", None)])
    assert [(r.score, r.accuracy, r.error) for r in results] == [(3.0, 1.0, None), (0.5, 0.0, None)]
    assert metrics["reward/errors_exception"] == 0


def test_a_returned_string_is_refused_naming_the_function(user_file):
    """Invariant: a result that is not a number or a dict with a numeric score (here a string, which float()
    would silently read) stops scoring with one RewardError line naming the function and what it returned, after
    the batch's other calls finished (the next batch still scores)."""
    reward = build_reward_function(RewardConfig(function=f"{user_file}:returns_text", num_workers=1))
    try:
        with pytest.raises(RewardError) as raised:
            reward.score_batch([("s", "fine", "1", None), ("s", "string", "1", None), ("s", "fine", "1", None)])
        message = str(raised.value)
        assert f"{user_file}:returns_text" in message and "str '1.0'" in message and "\n" not in message
        assert [r.score for r in reward.score_batch([("s", "fine", "1", None)])] == [1.0]
    finally:
        reward.close()
    with pytest.raises(RewardError, match="returned a 'score' of type str '1'"):
        _score(f"{user_file}:returns_text_score", [("s", "x", "1", None)])


def test_failures_score_zero_and_are_counted(user_file):
    """Invariant: a raising call, a call past reward.timeout_s and a call that kills its worker each yield
    score 0 with the error on the result and in the counters, and the other items are still scored."""
    results, metrics = _score(f"{user_file}:raises", [("s", "bad", "1", None), ("s", "good", "1", None),
                                                      ("s", "nan", "1", None)])
    assert results[0].score == 0.0 and results[0].error == "ZeroDivisionError: user bug"
    assert results[1].score == 1.0 and results[1].error is None
    assert results[2].score == 0.0 and "non-finite" in results[2].error
    assert metrics["reward/errors_exception"] == 2

    items = [("s", "slow", "1", None), ("s", "crash", "1", None)] + [("s", "fine", "1", None)] * 4
    results, metrics = _score(f"{user_file}:misbehaves", items, timeout_s=1.0)
    assert results[0].error == "timeout after 1 s" and results[0].score == 0.0
    assert results[1].error.startswith("worker died") and results[1].score == 0.0
    assert [r.score for r in results[2:]] == [1.0] * 4
    assert (metrics["reward/errors_exception"], metrics["reward/errors_timeout"]) == (1.0, 1.0)


def test_bad_specs_fail_at_build(tmp_path, user_file):
    """Invariant: a missing file, a missing function or a spec without a name stop at build time with RewardError."""
    for spec in [str(tmp_path / "absent.py") + ":f", f"{user_file}:absent", "unknown_builtin"]:
        with pytest.raises(RewardError, match="reward.function"):
            build_reward_function(RewardConfig(function=spec))
    with pytest.raises(RewardError, match="nothing would score"):
        build_reward_function(RewardConfig(function="none"))


def test_format_only_reward():
    """Invariant: function 'none' with a format weight scores the format alone, without worker processes."""
    reward = build_reward_function(RewardConfig(function="none", format_weight=1.0))
    results = reward.score_batch([("s", "<think>t</think>\\boxed{1}", "2", None), ("s", "1", "1", None)])
    assert [(r.score, r.accuracy, r.error) for r in results] == [(1.0, 0.0, None), (0.0, 0.0, None)]
    reward.close()


def test_builtin_boxed_math_with_format():
    """Invariant: the default built-in scores boxed answers by equivalence, and format_weight adds the format reward."""
    results, _ = _score("boxed_math", [("g", "<think>half</think> \\boxed{0.5}", "\\frac{1}{2}", None),
                                       ("g", "\\boxed{0.4}", "\\frac{1}{2}", None)], format_weight=0.5)
    assert [(r.score, r.accuracy) for r in results] == [(1.5, 1.0), (0.0, 0.0)]


def test_geo3k_blends_accuracy_and_format_as_verl():
    """Invariant: reward.function=geo3k scores 0.9 x accuracy + 0.1 x format (at most 1, as verl's geo3k), with
    accuracy and format as components; combining it with format_weight (a second format term) is refused."""
    items = [("g", "<think>half</think> \\boxed{0.5}", "\\frac{1}{2}", None), ("g", "\\boxed{0.5}", "0.5", None),
             ("g", "<think>guess</think> \\boxed{0.4}", "0.5", None), ("g", "0.5", "0.5", None)]
    results, _ = _score("geo3k", items)
    assert [r.score for r in results] == pytest.approx([1.0, 0.9, 0.1, 0.0])
    assert [(r.accuracy, r.components["format"]) for r in results] == [(1, 1), (1, 0), (0, 1), (0, 0)]
    with pytest.raises(RewardError, match="format_weight=0"):
        build_reward_function(RewardConfig(function="geo3k", format_weight=0.1))


def test_slow_import_does_not_count_against_timeout(tmp_path):
    """Invariant: a user module that takes longer to import than reward.timeout_s still scores its calls,
    because workers report ready before the first deadline starts."""
    path = tmp_path / "slow_import.py"
    path.write_text("import time\ntime.sleep(1.5)\n\ndef score(data_source, solution_str, ground_truth, extra_info):\n"
                    "    return 1.0\n")
    results, metrics = _score(f"{path}:score", [("s", "a", "1", None)] * 3, timeout_s=0.5)
    assert [r.score for r in results] == [1.0] * 3 and metrics["reward/errors_timeout"] == 0

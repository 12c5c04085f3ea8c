"""Held-out evaluation per data source (trainer/evaluation.py): reduced over data-parallel CPU ranks to the
values computed directly from the whole validation set, and a bad evaluation.metrics stopping the launch
with one ConfigError line before anything is built."""
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest

from tests.cpu_ranks import run_on_cpu_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROMPTS = 13  # rank 0 takes the even positions (source "a" only), rank 1 the odd ones ("a" and "b")
PLUG_INS = textwrap.dedent('''
    def words(data_source, solution_str, ground_truth, extra_info):
        return float(len(solution_str.split()))

    def fragile(data_source, solution_str, ground_truth, extra_info):
        if extra_info["index"] == 5:
            raise ZeroDivisionError("an odd response")
        return float(solution_str == ground_truth)
''')


def _prompt(index: int) -> SimpleNamespace:
    """A validation prompt with the fields evaluation reads; its echoed answer keeps index % 6 + 1 tokens."""
    ids = [(index * 7 + position * 3) % 50 + 1 for position in range(6)]
    source = "b" if index % 4 == 1 else "a"
    return SimpleNamespace(index=index, prompt_ids=ids, pixel_values=None, image_grid_thw=None, images=[],
                           prompt_text="", ground_truth=" ".join(map(str, ids)), data_source=source,
                           extra_info={"index": index}, messages=[], second_per_grid_ts=[])


def _answer_ids(prompt) -> list:
    return prompt.prompt_ids[:prompt.index % 6 + 1]


class EchoEngine:
    """Answers every sample of a prompt with the first index % 6 + 1 prompt tokens."""

    def generate(self, requests, sampling):
        from mmrl_megatron.rollout import RolloutResult

        by_ids = {tuple(_prompt(i).prompt_ids): _prompt(i) for i in range(PROMPTS)}
        return [RolloutResult(number, sample, _answer_ids(by_ids[tuple(request.prompt_ids)]), [0.0], "stop")
                for number, request in enumerate(requests) for sample in range(sampling.n)]


def _evaluate_share(plug_ins: str):
    import torch
    import torch.distributed as dist

    from mmrl_megatron.config import load_config
    from mmrl_megatron.parallel import ParallelDims, start_processes
    from mmrl_megatron.rewards.task_metrics import build_task_metrics
    from mmrl_megatron.trainer.evaluation import evaluate
    from mmrl_megatron.trainer.experience import ExperienceSources
    from tests.trainer.stand_ins import StandInReward, positions

    dims = start_processes(ParallelDims.from_config(load_config(None, []), dist.get_world_size(), None),
                           torch.device("cpu"))
    mine = [_prompt(i) for i in range(dist.get_rank(), PROMPTS, dist.get_world_size())]
    batches = [mine[start:start + 3] for start in range(0, len(mine), 3)]  # 3 batches on rank 0, 2 on rank 1
    metrics = build_task_metrics({"a": ["bleu", "exact_match", f"{plug_ins}:words"],
                                  "b": ["rouge", f"{plug_ins}:fragile"]}, "evaluation.metrics")
    sources = ExperienceSources(prompts=iter(()), engine=EchoEngine(), reward=StandInReward(),
                                decode=lambda ids: " ".join(map(str, ids)), positions=positions, dims=dims)
    return evaluate(batches, sources, max_new_tokens=8, temperature=1.0, samples_per_prompt=2, task_metrics=metrics)


def _expected() -> dict:
    """The per-source values computed from all 13 prompts at once, with sacrebleu and rouge-score directly."""
    from rouge_score import rouge_scorer
    from sacrebleu.metrics import BLEU

    from tests.trainer.stand_ins import StandInReward

    prompts = [_prompt(i) for i in range(PROMPTS)]
    answers = {p.index: " ".join(map(str, _answer_ids(p))) for p in prompts}
    rewards = {p.index: StandInReward().score_batch([SimpleNamespace(response_text=answers[p.index])])[0]
               for p in prompts}
    expected = {"eval/reward_greedy": sum(r.score for r in rewards.values()) / PROMPTS}
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    for source in ("a", "b"):
        mine = [p for p in prompts if p.data_source == source]

        def mean(values):
            return sum(values) / len(values)

        expected.update({f"val/{source}/accuracy": mean([rewards[p.index].accuracy for p in mine]),
                         f"val/{source}/reward": mean([rewards[p.index].score for p in mine]),
                         f"val/{source}/response_length": mean([len(_answer_ids(p)) for p in mine])})
        if source == "a":
            expected["val/a/bleu"] = BLEU().corpus_score([answers[p.index] for p in mine],
                                                         [[p.ground_truth for p in mine]]).score
            expected["val/a/exact_match"] = mean([float(answers[p.index] == p.ground_truth) for p in mine])
            expected["val/a/words"] = mean([len(_answer_ids(p)) for p in mine])
        else:
            for kind in ("rouge1", "rouge2", "rougeL"):
                expected[f"val/b/{kind}"] = mean([scorer.score(p.ground_truth, answers[p.index])[kind].fmeasure
                                                  for p in mine])
            kept = [p for p in mine if p.index != 5]
            expected["val/b/fragile"] = mean([float(answers[p.index] == p.ground_truth) for p in kept])
            expected["val/b/fragile_errors"] = 1.0
    return expected


def test_per_source_metrics_over_two_ranks_equal_the_whole_set(tmp_path):
    """Invariant: with each of 2 data-parallel ranks evaluating its share (one rank holding no prompt of source
    b, the two ranks running different numbers of batches), both ranks report, per data source, the
    accuracy, reward, response length and configured metrics of the whole set: corpus BLEU over all of
    source a's answers (not a mean over ranks), ROUGE and plug-in means weighted by answers, and a metric that
    raised on one answer counted and left out of its mean."""
    plug_ins = tmp_path / "plug_ins.py"
    plug_ins.write_text(PLUG_INS)
    per_rank = run_on_cpu_ranks(2, _evaluate_share, str(plug_ins))
    assert per_rank[0] == per_rank[1]
    expected = _expected()
    assert 0 < expected["val/a/bleu"] < 100 and 0 < expected["val/b/rouge2"] < 1  # neither trivially 0 nor exact
    reported = {key: per_rank[0][key] for key in expected}
    assert reported == pytest.approx(expected, rel=1e-9)
    assert {key.split("/")[1] for key in per_rank[0] if key.startswith("val/")} == {"a", "b"}


def _validation_file(path, sources):
    from mmrl_megatron.data.format import make_row, write_rows

    write_rows(str(path), [make_row("q", [], "1", source) for source in sources])


@pytest.mark.parametrize("metrics, val_files, message", [
    ({"a": ["rouge", "blue"]}, True, r"evaluation.metrics.a: unknown metric 'blue' \(did you mean 'bleu'\?\)"),
    ({"a": ["missing.py:score"]}, True, r"evaluation.metrics.a 'missing.py:score': file missing.py does not exist"),
    ({"a": ["bleu"], "c": ["bleu"]}, True, r"data source\(s\) \['c'\] that data.val_files do not hold "
                                           r"\(their data_source values: \['a', 'b'\]\)"),
    ({"a": ["bleu"]}, False, r"evaluation.metrics is set but data.val_files is empty"),
])
def test_bad_evaluation_config_is_one_config_error_at_start(tmp_path, metrics, val_files, message):
    """Invariant: an unknown metric name, a missing plug-in file, a data source the validation files do not
    hold, or metrics without validation files raise ConfigError naming the key before anything is built."""
    from mmrl_megatron.config import ConfigError, load_config
    from mmrl_megatron.trainer.evaluation import check_evaluation_config

    _validation_file(tmp_path / "val.parquet", ["a", "b", "a"])
    config = load_config(None, [f"data.val_files=[{tmp_path}/val.parquet]" if val_files else "data.val_files=[]"])
    config.evaluation.metrics = metrics
    with pytest.raises(ConfigError, match=message):
        check_evaluation_config(config)
    config.evaluation.metrics = {"a": ["bleu"], "b": ["exact_match"]}
    if val_files:
        check_evaluation_config(config)  # the same files with sources they hold pass


def test_launch_with_a_bad_metric_stops_with_one_line(tmp_path):
    """Invariant: launch/train.py with a misspelled metric exits with status 2 and one "config error:" line
    naming evaluation.metrics.<source> and the closest built-in, before the demo assets are built."""
    assets = tmp_path / "assets"
    command = [sys.executable, "launch/train.py", "--config", "yaml_configs/demo_cpu.yaml",
               f"model.hf_path={assets}/model", f"data.train_files=[{assets}/train.parquet]",
               f"data.val_files=[{assets}/test.parquet]", f"trainer.run_dir={tmp_path}/run",
               "evaluation.metrics.synthetic_counting=[math_accuracy,rougel]"]
    result = subprocess.run(command, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "config error: evaluation.metrics.synthetic_counting: unknown metric 'rougel' (did you mean 'rouge'?); "
        "give one of ['bleu', 'exact_match', 'math_accuracy', 'rouge'] or 'path/to/file.py:function_name'"]
    assert not assets.exists()

"""Evaluation by task end to end: a tiny run (trainer/run.py on 2 CPU data-parallel ranks, the tiny Qwen2.5-VL,
the embedded engine) over a validation parquet with two data sources logs every per-source metric to
metrics.jsonl, tensorboard and the offline wandb run, read back from each."""
import glob
import json
import math
import os
import subprocess
import sys

import pytest

from tests.cpu_ranks import run_on_cpu_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vision_hidden_size=32, vision_intermediate_size=64, vision_num_heads=2, vision_out_hidden_size=32,
            vision_depth=1)
# an untrained model's answers are never right: a reward that follows the row (its index in the file) keeps
# the checks of the reported values from passing on zeros; accuracy 1 on rows 0 and 4 (both of count_a)
PLUG_IN = '''
def by_row(data_source, solution_str, ground_truth, extra_info):
    return {"score": extra_info["index"] + len(set(solution_str)) / 8, "acc": float(extra_info["index"] % 4 == 0)}

def answer_chars(data_source, solution_str, ground_truth, extra_info):
    return float(len(set(solution_str)))
'''
EXPECTED = {"count_a": ("accuracy", "reward", "response_length", "math_accuracy", "exact_match", "bleu",
                        "answer_chars"),
            "count_b": ("accuracy", "reward", "response_length", "rouge1", "rouge2", "rougeL", "exact_match")}
KEYS = [f"val/{source}/{key}" for source, keys in EXPECTED.items() for key in keys]


def _assets(root) -> None:
    """The tiny model, 8 training rows, 8 validation rows alternating between two data sources, the plug-ins."""
    from mmrl_megatron.data.format import write_rows
    from mmrl_megatron.data.synthetic import make_rows
    from mmrl_megatron.models.qwen2_5_vl.tiny import build_tiny_checkpoint

    build_tiny_checkpoint(f"{root}/model", seed=3, **TINY)
    write_rows(f"{root}/train.parquet", make_rows(8, 0, "train"))
    validation = make_rows(8, 1, "test")
    for index, row in enumerate(validation):
        row["data_source"] = "count_a" if index % 2 == 0 else "count_b"
    write_rows(f"{root}/val.parquet", validation)
    with open(f"{root}/my_metric.py", "w") as handle:
        handle.write(PLUG_IN)


def _train(root: str):
    from mmrl_megatron.trainer.run import run_training

    overrides = [f"model.hf_path={root}/model", f"data.train_files=[{root}/train.parquet]",
                 f"data.val_files=[{root}/val.parquet]", f"trainer.run_dir={root}/run",
                 "trainer.prepare_demo_assets=false", "trainer.warmup_sft_steps=0", "trainer.steps=1",
                 "trainer.eval_every=1", "trainer.save_every=-1", "data.prompts_per_step=2", "rollout.n=2",
                 "rollout.max_new_tokens=8", "logging.wandb=true", "logging.wandb_mode=offline",
                 "logging.tensorboard=true", "logging.console=false", "logging.plot_at_end=false",
                 f"evaluation.metrics.count_a=[math_accuracy,exact_match,bleu,{root}/my_metric.py:answer_chars]",
                 "evaluation.metrics.count_b=[rouge,exact_match]",
                 f"reward.function={root}/my_metric.py:by_row"]
    return run_training(os.path.join(ROOT, "yaml_configs", "demo_cpu.yaml"), overrides)


def _wandb_history(run_dir) -> dict:
    """{step: logged values} from the offline run's .wandb log, read by wandb's own reader."""
    [offline_run] = glob.glob(os.path.join(run_dir, "wandb", "offline-run-*"))
    result = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", offline_run, "--json"],
                            capture_output=True, text=True, timeout=120, check=True)
    history = {}
    for line in result.stdout.splitlines():
        record = json.loads(line)
        if record.get("type") == "history":
            history[record["history"]["step"]["num"]] = record["history"]["item"]
    return history


def _tensorboard_scalars(run_dir) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(os.path.join(run_dir, "tensorboard"))
    events.Reload()
    return {tag: {event.step: event.value for event in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def test_two_data_sources_reach_jsonl_tensorboard_and_wandb(tmp_path):
    """Invariant: at step 0 and after the first step, each data source's accuracy, reward, response length and
    configured metrics (built-ins and a plug-in) are logged under val/<data_source>/<key> with the same value
    in metrics.jsonl, tensorboard and wandb; the overall greedy accuracy and reward are the answer-weighted
    means of the two sources' (4 prompts each; rank 0 reads count_a's rows, rank 1 count_b's), and a source's
    accuracy is its rows' (the reward follows the row)."""
    _assets(tmp_path)
    run_on_cpu_ranks(2, _train, str(tmp_path))
    run_dir = tmp_path / "run"
    with open(run_dir / "metrics.jsonl") as handle:
        records = {record["step"]: record for record in map(json.loads, handle)}
    assert sorted(records) == [0, 1]
    scalars, history = _tensorboard_scalars(run_dir), _wandb_history(run_dir)
    for step, record in records.items():
        for key in KEYS:
            assert isinstance(record.get(key), float) and math.isfinite(record[key]), (step, key, record.get(key))
            assert scalars[key][step] == pytest.approx(record[key], rel=1e-6), (step, key)  # float32 events
            assert history[step][key] == pytest.approx(record[key], rel=1e-12), (step, key)
        assert (record["val/count_a/accuracy"], record["val/count_b/accuracy"]) == (0.5, 0.0)
        assert 3 < record["val/count_a/reward"] < 4 < record["val/count_b/reward"] < 5  # mean index 3 and 4
        for kind in ("accuracy", "reward"):
            per_source = (record[f"val/count_a/{kind}"] + record[f"val/count_b/{kind}"]) / 2
            assert record[f"eval/{kind}_greedy"] == pytest.approx(per_source, rel=1e-9), (step, kind)

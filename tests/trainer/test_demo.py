"""The README's main job, shortened: torchrun on 2 CPU processes with yaml_configs/demo_cpu.yaml builds its
tiny model and synthetic data, warms up, runs GRPO steps with held-out evaluation, writes metrics, curves,
the resolved config and a checkpoint, and a second launch resumes from that checkpoint."""
import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _launch(tmp_path, *overrides: str) -> subprocess.CompletedProcess:
    assets = tmp_path / "assets"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29563",
               "launch/train.py", "--config", "yaml_configs/demo_cpu.yaml",
               f"model.hf_path={assets}/model", f"data.train_files=[{assets}/train.parquet]",
               f"data.val_files=[{assets}/test.parquet]", f"trainer.run_dir={tmp_path}/run",
               "trainer.warmup_sft_steps=3", "trainer.eval_every=2", "data.prompts_per_step=4", "rollout.n=4",
               "logging.wandb=false", *overrides]
    environment = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    return subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=600)


def _records(tmp_path):
    with open(tmp_path / "run" / "metrics.jsonl") as handle:
        return [json.loads(line) for line in handle]


def _training_rows_with_bad_ones(path) -> None:
    """12 synthetic rows plus a corrupt image, a row without reward_model and a prompt 10x over the limit."""
    from mmrl_megatron.data.format import write_rows
    from mmrl_megatron.data.synthetic import make_rows

    rows = make_rows(15, seed=0, split="train")
    rows[3]["images"] = [{"bytes": rows[3]["images"][0]["bytes"][:40]}]
    rows[7]["reward_model"] = None
    rows[11]["prompt"] = [{"role": "user", "content": "<image>" + "count " * 500}]  # 3,000 tokens; limit 256
    path.parent.mkdir(parents=True)
    write_rows(str(path), rows)


def _exported_tensors(directory) -> dict:
    from safetensors.torch import load_file

    tensors = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(directory, name)))
    return tensors


def _assert_checkpoint_exports_the_final_model(run) -> None:
    """mcore_to_hf.py on the last checkpoint alone gives the tensors and side files the run exported itself."""
    import torch

    out = run / "from_checkpoint"
    command = [sys.executable, "tools/checkpoint_convert/mcore_to_hf.py", "--mcore-dir",
               str(run / "checkpoints" / "step_00000002"), "--out", str(out)]
    environment = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, MASTER_ADDR="127.0.0.1", MASTER_PORT="29564")
    converted = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=300)
    assert converted.returncode == 0, converted.stderr[-4000:]
    exported, from_checkpoint = _exported_tensors(run / "hf_export"), _exported_tensors(out)
    assert sorted(exported) == sorted(from_checkpoint) and exported
    for name, tensor in exported.items():
        assert torch.equal(from_checkpoint[name], tensor), name
    side_files = {name for name in os.listdir(run / "hf_export") if not name.startswith("model")}
    assert "config.json" in side_files and side_files <= set(os.listdir(out))


def test_demo_runs_end_to_end_and_resumes(tmp_path):
    """Invariant: the main job runs from nothing on 2 CPU ranks (model built, warm-up, GRPO, evaluation,
    curves, checkpoint, HF export), trains past a corrupt image, a missing field and an over-long prompt
    while counting each; the checkpoint alone exports (mcore_to_hf.py) exactly the model the run exported;
    and a relaunch with more steps resumes after the last checkpointed step."""
    _training_rows_with_bad_ones(tmp_path / "assets" / "train.parquet")
    first = _launch(tmp_path, "trainer.steps=2", "trainer.export_hf=true")
    assert first.returncode == 0, first.stderr[-4000:]
    records = _records(tmp_path)
    steps = [r for r in records if r["step"] > 0]
    assert [r["step"] for r in steps] == [1, 2]
    for key in ("reward/mean", "loss/policy", "actor/grad_norm", "throughput/tokens_per_s_per_gpu"):
        assert math.isfinite(steps[-1][key]), key
    evaluations = [r for r in records if "eval/reward_sampled" in r]
    assert [r["step"] for r in evaluations] == [0, 2]  # before GRPO, then every 2 steps
    assert "warmup/sft_loss" in records[0]
    # 20 prompts drawn from 12 usable rows: the epoch wrapped, and every bad row was met and counted
    assert steps[-1]["data/epoch"] >= 1
    for reason in ("undecodable_image", "missing_field", "overlong_prompt"):
        assert steps[-1][f"data/skipped_{reason}"] >= 1, reason
    run = tmp_path / "run"
    assert (run / "curves.png").stat().st_size > 10_000
    assert (run / "checkpoints" / "latest").read_text() == "step_00000002"
    assert "warmup_sft_steps: 3" in (run / "config.yaml").read_text()
    _assert_checkpoint_exports_the_final_model(run)

    second = _launch(tmp_path, "trainer.steps=3")
    assert second.returncode == 0, second.stderr[-4000:]
    resumed = [r["step"] for r in _records(tmp_path)[len(records):]]
    assert resumed == [3], resumed  # no second warm-up or step-0 evaluation, only the new step
    assert (run / "checkpoints" / "latest").read_text() == "step_00000003"


def test_config_mistakes_stop_the_launch_with_the_key_named(tmp_path):
    """Invariant: a misspelled key stops launch/train.py before anything is built, naming the key and the
    closest valid one, with exit status 2."""
    result = _launch(tmp_path, "trainer.stpes=2")
    assert result.returncode != 0
    assert "trainer.stpes" in result.stderr and "trainer.steps" in result.stderr
    assert not (tmp_path / "assets").exists()

"""Checkpoints: a run resumed from its step-2 checkpoint in fresh processes reproduces the uninterrupted
run's metrics for steps 3-4 exactly (CPU); the TP=2 checkpoint also resumes at TP=1; a crash mid-save
never moves `latest`."""
import json
import math
import os
import shutil

import pytest

from tests.cpu_ranks import run_on_cpu_ranks

COMPARED = ("reward/mean", "loss/policy", "kl/mean", "actor/grad_norm", "actor/entropy", "actor/lr",
            "critic/value_loss", "rollout/logprob_abs_diff")


def _run(run_dir, overrides):
    from tests.trainer.stand_ins import stand_in_config, stand_in_trainer

    trainer = stand_in_trainer(stand_in_config(run_dir, overrides))
    trainer.run()
    trainer.parts.tracker.close()
    return trainer.parts.state["step"]


def _metrics_by_step(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as handle:
        records = [json.loads(line) for line in handle]
    return {record["step"]: record for record in records}


COMMON = ["trainer.steps=4", "trainer.save_every=2", "algorithm.advantage=gae", "actor.optim.lr_schedule=cosine",
          "actor.optim.warmup_steps=1"]


def test_resume_reproduces_uninterrupted_run_and_reshards(tmp_path):
    """Invariant: resuming restores model, optimizer, schedule, data position and RNG, so steps 3-4 match the
    uninterrupted run bit for bit at the same layout, and within 1e-4 after resharding TP=2 -> TP=1."""
    whole, resumed, resharded = (str(tmp_path / name) for name in ("whole", "resumed", "resharded"))
    run_on_cpu_ranks(2, _run, whole, COMMON + ["parallel.tensor=2"])
    for target in (resumed, resharded):  # the state a run killed right after step 2 leaves behind
        os.makedirs(os.path.join(target, "checkpoints"))
        shutil.copytree(os.path.join(whole, "checkpoints", "step_00000002"),
                        os.path.join(target, "checkpoints", "step_00000002"))
        with open(os.path.join(target, "checkpoints", "latest"), "w") as handle:
            handle.write("step_00000002")
    assert run_on_cpu_ranks(2, _run, resumed, COMMON + ["parallel.tensor=2"]) == [4, 4]
    assert run_on_cpu_ranks(1, _run, resharded, COMMON + ["parallel.tensor=1"]) == [4]
    expected, again, other_layout = (_metrics_by_step(d) for d in (whole, resumed, resharded))
    assert sorted(again) == [3, 4]
    for step in (3, 4):
        for key in COMPARED:
            assert again[step][key] == expected[step][key], (step, key)
            assert math.isclose(other_layout[step][key], expected[step][key], rel_tol=1e-4, abs_tol=1e-6), (step, key)


def test_latest_is_not_moved_by_an_unfinished_save(tmp_path):
    """Invariant: a leftover step_N.tmp directory (a crash mid-save) is never what `latest` names."""
    from mmrl_megatron.trainer.checkpoint import CheckpointError, latest_checkpoint

    root = tmp_path / "checkpoints"
    (root / "step_00000004.tmp").mkdir(parents=True)
    (root / "step_00000002").mkdir()
    (root / "latest").write_text("step_00000002")
    assert latest_checkpoint(str(root)) == str(root / "step_00000002")
    (root / "latest").write_text("step_00000009")
    with pytest.raises(CheckpointError, match="step_00000009"):
        latest_checkpoint(str(root))

"""Checkpoints: a run resumed from its step-2 checkpoint in fresh processes reproduces the uninterrupted
run's metrics for steps 3-4 exactly (CPU); the TP=2 checkpoint also resumes at TP=1; a crash mid-save
never moves `latest`; damaged checkpoints are named and skipped; SAVE_AND_EXIT is cleared once honoured;
resumed steps are logged once; a checkpoint written before the TrainerState class resumes; keep_last retains
the newest checkpoints with their fallback."""
import fnmatch
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
    return trainer.state.step


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
    """Invariant: a leftover step_N.tmp directory (a crash mid-save) is never a checkpoint to resume from; resume
    tries the one `latest` names, even when it is missing (the warning says so), then the older ones."""
    from mmrl_megatron.trainer.checkpoint import resume_candidates

    root = tmp_path / "checkpoints"
    (root / "step_00000004.tmp").mkdir(parents=True)
    for step in (1, 2):
        (root / f"step_0000000{step}").mkdir()
    assert resume_candidates(str(root)) == []
    (root / "latest").write_text("step_00000002")
    assert resume_candidates(str(root)) == [str(root / "step_00000002"), str(root / "step_00000001")]
    (root / "latest").write_text("step_00000009")
    assert resume_candidates(str(root)) == [str(root / f"step_0000000{step}") for step in (9, 2, 1)]


def _checkpoint_files(root, step, pattern):
    directory = os.path.join(root, f"step_{step:08d}")
    return sorted(os.path.join(directory, name) for name in os.listdir(directory) if fnmatch.fnmatch(name, pattern))


class _Payload:
    """A pickled object that runs code when unpickled: what weights_only=True must refuse."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def _resume_after_faults(run_dir):
    """On every rank: train 3 steps with a checkpoint each, then damage them newest first and resume after each
    fault. Returns [(resumed step or None, CheckpointError message or None, warnings logged)] per fault."""
    import logging

    import torch
    import torch.distributed as dist

    from mmrl_megatron.trainer.checkpoint import CheckpointError, write_manifest
    from tests.trainer.stand_ins import stand_in_config, stand_in_trainer

    config = stand_in_config(run_dir, ["trainer.steps=3", "trainer.save_every=1"])
    trainer = stand_in_trainer(config)
    trainer.run()
    trainer.parts.tracker.close()
    checkpointer, root = trainer.parts.checkpointer, trainer.parts.checkpointer.root
    warnings = []

    class Collect(logging.Handler):
        def emit(self, record):
            warnings.append(record.getMessage())

    logging.getLogger("mmrl_megatron.trainer.checkpoint").addHandler(Collect(logging.WARNING))

    def truncate_distcp():
        path = _checkpoint_files(root, 3, "*.distcp")[-1]
        with open(path, "r+b") as handle:
            handle.truncate(os.path.getsize(path) // 2)

    def delete_rng():
        os.remove(_checkpoint_files(root, 2, "rng_rank00001.pt")[0])

    def unsafe_data_state():  # a pickle that would run code, with the manifest rewritten to match it
        torch.save({"payload": _Payload(os.path.join(run_dir, "executed"))},
                   _checkpoint_files(root, 1, "data_dp00001.pt")[0])
        write_manifest(os.path.join(root, "step_00000001"))

    def corrupt_data_state():
        path = _checkpoint_files(root, 1, "data_dp00000.pt")[0]
        with open(path, "r+b") as handle:
            handle.write(b"\0" * 16)

    outcomes = []
    for fault in (truncate_distcp, delete_rng, unsafe_data_state, corrupt_data_state):
        if dist.get_rank() == 0:
            fault()
        dist.barrier()
        del warnings[:]
        try:
            checkpointer.resume("auto")
            outcomes.append((checkpointer.trainer_state.step, None, list(warnings)))
        except CheckpointError as error:
            outcomes.append((None, str(error), list(warnings)))
    outcomes.append(os.path.exists(os.path.join(run_dir, "executed")))
    return outcomes


def test_damaged_checkpoints_fall_back_with_the_bad_file_named(tmp_path):
    """Invariant: a checkpoint with a truncated .distcp, a deleted RNG file or a data-state file that is corrupted
    (or holds a pickle that would run code, refused by weights_only loading) is skipped for the previous complete
    one with a warning naming that file (from rank 0), every rank alike; with none left, resume raises one
    CheckpointError line naming each bad file; nothing in a state file is executed."""
    run_dir = str(tmp_path / "run")
    per_rank = run_on_cpu_ranks(2, _resume_after_faults, run_dir)
    (truncated, no_rng, unsafe, corrupt, executed), other_rank = per_rank
    assert [outcome[:2] for outcome in other_rank[:4]] == [outcome[:2] for outcome in per_rank[0][:4]]
    assert all(outcome[2] == [] for outcome in other_rank[:4])  # rank 0 warns
    root = os.path.join(run_dir, "checkpoints")
    distcp = os.path.basename(_checkpoint_files(root, 3, "*.distcp")[-1])
    assert truncated[:2] == (2, None) and len(truncated[2]) == 1
    assert f"step_00000003/{distcp}" in truncated[2][0] and "truncated" in truncated[2][0]
    assert no_rng[:2] == (1, None) and "step_00000002/rng_rank00001.pt is missing" in no_rng[2][-1]
    step, error, warned = unsafe
    assert step is None and "\n" not in error and len(warned) == 3
    for expected in (f"step_00000003/{distcp}", "step_00000002/rng_rank00001.pt", "step_00000001/data_dp00001.pt"):
        assert expected in error, (expected, error)
    assert "weights_only" in error.split("data_dp00001.pt")[1], error
    assert "step_00000001/data_dp00000.pt differs" in corrupt[1]
    assert not executed


def _stop_then_relaunch_then_crash(run_dir):
    """One rank: a run finding SAVE_AND_EXIT, a plain relaunch, then a crash after step 3 is logged but before
    its checkpoint (step 3's checkpoint removed, `latest` back at step 2) and a relaunch to step 4. Returns the
    steps reached and whether the stop file was left."""
    from mmrl_megatron.trainer.loop import STOP_FILE

    os.makedirs(run_dir)
    open(os.path.join(run_dir, STOP_FILE), "w").close()
    stopped_at = _run(run_dir, ["trainer.steps=3", "trainer.save_every=1"])
    left = os.path.exists(os.path.join(run_dir, STOP_FILE))
    relaunched_to = _run(run_dir, ["trainer.steps=3", "trainer.save_every=1"])
    root = os.path.join(run_dir, "checkpoints")
    shutil.rmtree(os.path.join(root, "step_00000003"))
    with open(os.path.join(root, "latest"), "w") as handle:
        handle.write("step_00000002")
    resumed_to = _run(run_dir, ["trainer.steps=4", "trainer.save_every=1"])
    return stopped_at, left, relaunched_to, resumed_to


def test_stop_file_is_cleared_and_resumed_steps_are_logged_once(tmp_path):
    """Invariants: SAVE_AND_EXIT stops the run after a checkpoint and is removed with it, so a plain relaunch
    trains to trainer.steps; a run resumed from an older checkpoint than its last logged step logs each step
    once in metrics.jsonl (the repeated steps replace the lines the crashed run wrote)."""
    run_dir = str(tmp_path / "run")
    stopped_at, left, relaunched_to, resumed_to = run_on_cpu_ranks(1, _stop_then_relaunch_then_crash, run_dir)[0]
    assert (stopped_at, left, relaunched_to, resumed_to) == (1, False, 3, 4)
    with open(os.path.join(run_dir, "metrics.jsonl")) as handle:
        steps = [json.loads(line)["step"] for line in handle]
    assert steps == [1, 2, 3, 4]


def test_launch_reports_a_checkpoint_error_in_one_line(monkeypatch, capsys):
    """Invariant: a CheckpointError ends launch/train.py with exit status 2 and its message as one stderr line,
    no traceback."""
    import importlib.util

    import mmrl_megatron.trainer.run as run
    from mmrl_megatron.trainer.checkpoint import CheckpointError

    spec = importlib.util.spec_from_file_location("train_entry", os.path.join(os.path.dirname(__file__), "..", "..",
                                                                                "launch", "train.py"))
    entry = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(entry)

    def damaged(config_path, overrides):
        raise CheckpointError("no usable checkpoint in runs/x/checkpoints: runs/x/checkpoints/step_1/a.distcp "
                              "is missing")

    monkeypatch.setattr(run, "run_training", damaged)
    assert entry.main(["--config", "unused.yaml"]) == 2
    assert capsys.readouterr().err == ("checkpoint error: no usable checkpoint in runs/x/checkpoints: "
                                       "runs/x/checkpoints/step_1/a.distcp is missing\n")


LEGACY_RUN = os.path.join(os.path.dirname(__file__), "data", "legacy_run")
LEGACY_OVERRIDES = ["trainer.steps=3", "trainer.save_every=2", "algorithm.kl_coef=0"]


def _resume_legacy(run_dir):
    from tests.trainer.stand_ins import stand_in_config, stand_in_trainer

    trainer = stand_in_trainer(stand_in_config(run_dir, LEGACY_OVERRIDES))
    resumed_state = trainer.state.state_dict()
    trainer.run()
    trainer.parts.tracker.close()
    return resumed_state, trainer.state.state_dict()


def test_a_checkpoint_from_before_the_trainer_state_class_resumes(tmp_path):
    """Invariant (backward compatibility): the step-2 checkpoint the pre-issue-18 code wrote (tests/trainer/data/
    legacy_run) restores the trainer state, data position, model, optimizer and RNG, so step 3 reproduces that
    run's own step-3 metrics."""
    run_dir = str(tmp_path / "run")
    shutil.copytree(os.path.join(LEGACY_RUN, "checkpoints"), os.path.join(run_dir, "checkpoints"))
    [(resumed, final)] = run_on_cpu_ranks(1, _resume_legacy, run_dir)
    assert resumed == {"step": 2, "nonfinite_skips": 0, "consecutive_nonfinite": 0, "warmup_done": True}
    assert final["step"] == 3
    with open(os.path.join(LEGACY_RUN, "step_3_metrics.json")) as handle:
        expected = json.load(handle)["3"]
    again = _metrics_by_step(run_dir)
    assert sorted(again) == [3]
    for key, value in expected.items():
        assert math.isclose(again[3][key], value, rel_tol=1e-6, abs_tol=1e-9), (key, again[3][key], value)


def _keep_two_then_damage_the_newest(run_dir):
    """Train 4 steps with a checkpoint each and trainer.keep_last=2; list what is left; truncate the newest
    checkpoint's .distcp file and resume. Returns (directories left, `latest`, the step resumed at)."""
    from tests.trainer.stand_ins import stand_in_config, stand_in_trainer

    trainer = stand_in_trainer(stand_in_config(run_dir, ["trainer.steps=4", "trainer.save_every=1",
                                                         "trainer.keep_last=2"]))
    trainer.run()
    trainer.parts.tracker.close()
    root = trainer.parts.checkpointer.root
    left = sorted(os.listdir(root))
    with open(os.path.join(root, "latest")) as handle:
        latest = handle.read()
    path = _checkpoint_files(root, 4, "*.distcp")[-1]
    with open(path, "r+b") as handle:
        handle.truncate(os.path.getsize(path) // 2)
    trainer.parts.checkpointer.resume("auto")
    return left, latest, trainer.state.step


def test_keep_last_retains_the_newest_checkpoints_and_their_fallback(tmp_path):
    """Invariant: with trainer.keep_last=2 only the two newest checkpoints remain after each save (and `latest`
    names the newest); when the newest is damaged, resume falls back to the other one."""
    [(left, latest, resumed_at)] = run_on_cpu_ranks(1, _keep_two_then_damage_the_newest, str(tmp_path / "run"))
    assert left == ["latest", "step_00000003", "step_00000004"]
    assert latest == "step_00000004" and resumed_at == 3

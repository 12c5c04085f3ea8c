"""Metrics reach metrics.jsonl always, the console, wandb (offline) and tensorboard when enabled."""
import json
import os

from mmrl_megatron.config.schema import LoggingConfig
from mmrl_megatron.trainer.tracking import build_tracker


def test_jsonl_console_tensorboard_and_offline_wandb(tmp_path, capsys):
    """Invariant: every logged step is one JSON line; enabled sinks each receive it."""
    config = LoggingConfig(wandb=True, wandb_mode="offline", tensorboard=True, run_name="t")
    tracker = build_tracker(config, str(tmp_path), is_main=True)
    tracker.log(1, {"reward/mean": 0.25, "loss/policy": -0.5})
    tracker.log(2, {"reward/mean": 0.5, "loss/policy": float("nan")})
    tracker.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert records[0]["reward/mean"] == 0.25 and records[1]["loss/policy"] == "nan"
    assert "step 2 | reward/mean=0.5" in capsys.readouterr().out
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(tmp_path / "tensorboard"))
    assert any(name.startswith("offline-run") for name in os.listdir(tmp_path / "wandb"))


def test_other_ranks_write_nothing(tmp_path):
    tracker = build_tracker(LoggingConfig(wandb=False), str(tmp_path / "run"), is_main=False)
    tracker.log(1, {"reward/mean": 1.0})
    tracker.close()
    assert not (tmp_path / "run").exists()


def test_a_resumed_run_replaces_the_steps_it_repeats(tmp_path):
    """Invariant: the first step a new tracker logs drops metrics.jsonl's lines from that step on (those a crashed
    run logged after its last checkpoint, and a line the crash cut short), and tensorboard's events from it, so
    each step appears once, with the resumed run's value."""
    import time

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = LoggingConfig(wandb=False, console=False, tensorboard=True)
    first = build_tracker(config, str(tmp_path), is_main=True)
    for step in (1, 2, 3):
        first.log(step, {"reward/mean": float(step)})
    first.close()
    with open(tmp_path / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 4, "rew')  # the crash cut the last line short
    time.sleep(1)  # tensorboard names event files by the second: the resumed run's must sort after
    resumed = build_tracker(config, str(tmp_path), is_main=True)
    resumed.log(3, {"reward/mean": 30.0})
    resumed.log(4, {"reward/mean": 40.0})
    resumed.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["reward/mean"]) for r in records] == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("reward/mean")] == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]

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

"""Per-step metrics to the console, run_dir/metrics.jsonl (always), wandb and tensorboard.

Only the main rank writes; every other rank gets a tracker that does nothing, so the loop never
branches on rank or on which sinks are enabled.

A run resumed from a checkpoint repeats the steps logged after it (the process died before saving them
again). So the first step a tracker logs replaces what the files hold from that step on: metrics.jsonl
keeps only the lines before it, and tensorboard purges its events from it. (wandb, resumed with the same
run id, ignores steps it has seen.)
"""
import json
import math
import os
import sys
import time
from typing import Dict, Iterable, List, Optional

from tqdm.auto import tqdm

from ..config.schema import LoggingConfig

Metrics = Dict[str, float]

# The step line shows these first, in this order, when present; the rest follow alphabetically.
CONSOLE_FIRST = ("reward/mean", "reward/accuracy", "loss/policy", "kl/mean", "response/length_mean",
                 "time/step_s", "throughput/tokens_per_s_per_gpu")


class MetricSink:
    def log(self, step: int, metrics: Metrics) -> None:
        pass

    def close(self) -> None:
        pass


def _drop_lines_from(path: str, step: int) -> None:
    """Rewrite metrics.jsonl without its lines for `step` and later (atomically: a crash keeps the old file)."""
    if not os.path.exists(path):
        return
    with open(path) as handle:
        kept = [line for line in handle if _line_step(line) < step]
    with open(path + ".tmp", "w") as handle:
        handle.writelines(kept)
    os.replace(path + ".tmp", path)


def _line_step(line: str) -> float:
    """A line's step; a line cut short by a crash counts as the last step, so it is dropped."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


class JsonlSink(MetricSink):
    """One JSON object per step, flushed at once so a crash loses at most the current step. The first step
    logged replaces the file's lines from that step on (a resumed run's repeated steps)."""

    def __init__(self, path: str):
        self._path = path
        self._handle = None

    def log(self, step, metrics):
        if self._handle is None:
            _drop_lines_from(self._path, step)
            self._handle = open(self._path, "a", buffering=1)
        record = {"step": step, "time": time.time()}
        record.update({k: (v if math.isfinite(v) else str(v)) for k, v in metrics.items()})
        self._handle.write(json.dumps(record) + "\n")

    def close(self):
        if self._handle is not None:
            self._handle.close()


class ConsoleSink(MetricSink):
    def __init__(self, stream=None):
        self._stream = stream or sys.stdout

    def log(self, step, metrics):
        ordered = [k for k in CONSOLE_FIRST if k in metrics] + sorted(k for k in metrics if k not in CONSOLE_FIRST)
        fields = " ".join(f"{k}={metrics[k]:.4g}" for k in ordered)
        tqdm.write(f"step {step} | {fields}", file=self._stream)


class WandbSink(MetricSink):
    def __init__(self, config: LoggingConfig, run_dir: str, resolved_config: Optional[dict]):
        import wandb

        self._wandb = wandb
        self._run = wandb.init(project=config.project, name=config.run_name, dir=run_dir, mode=config.wandb_mode,
                               config=resolved_config, resume="allow")

    def log(self, step, metrics):
        self._run.log(metrics, step=step)

    def close(self):
        self._run.finish()


class TensorboardSink(MetricSink):
    """Opened at the first step logged, purging the events of that step and later (a resumed run's repeats)."""

    def __init__(self, run_dir: str):
        self._directory = os.path.join(run_dir, "tensorboard")
        self._writer = None

    def log(self, step, metrics):
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(self._directory, purge_step=step)
        for key, value in metrics.items():
            self._writer.add_scalar(key, value, step)
        self._writer.flush()

    def close(self):
        if self._writer is not None:
            self._writer.close()


class Tracker:
    """Fans one step's metrics out to every enabled sink."""

    def __init__(self, sinks: List[MetricSink]):
        self._sinks = sinks

    def log(self, step: int, metrics: Metrics) -> None:
        scalars = {k: float(v) for k, v in metrics.items()}
        for sink in self._sinks:
            sink.log(step, scalars)

    def close(self) -> None:
        for sink in self._sinks:
            sink.close()


def build_tracker(config: LoggingConfig, run_dir: str, is_main: bool, resolved_config: Optional[dict] = None) -> Tracker:
    """The main rank's tracker writes metrics.jsonl always, plus the sinks the config enables."""
    if not is_main:
        return Tracker([])
    os.makedirs(run_dir, exist_ok=True)
    sinks: List[MetricSink] = [JsonlSink(os.path.join(run_dir, "metrics.jsonl"))]
    if config.console:
        sinks.append(ConsoleSink())
    if config.wandb and config.wandb_mode != "disabled":
        sinks.append(WandbSink(config, run_dir, resolved_config))
    if config.tensorboard:
        sinks.append(TensorboardSink(run_dir))
    return Tracker(sinks)


def progress(iterable: Iterable, desc: str, total: Optional[int] = None, enabled: Optional[bool] = None):
    """A progress bar for long phases (generation, scoring, conversion), shown on rank 0 unless told otherwise."""
    if enabled is None:
        enabled = int(os.environ.get("RANK", "0")) == 0
    return tqdm(iterable, desc=desc, total=total, disable=not enabled, dynamic_ncols=True, leave=False)

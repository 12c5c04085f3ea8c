"""Per-step metrics to the console, run_dir/metrics.jsonl (always), wandb and tensorboard.

Only the main rank writes; every other rank gets a tracker that does nothing, so the loop never
branches on rank or on which sinks are enabled.
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


class JsonlSink(MetricSink):
    """One JSON object per step, flushed at once so a crash loses at most the current step."""

    def __init__(self, path: str):
        self._handle = open(path, "a", buffering=1)

    def log(self, step, metrics):
        record = {"step": step, "time": time.time()}
        record.update({k: (v if math.isfinite(v) else str(v)) for k, v in metrics.items()})
        self._handle.write(json.dumps(record) + "\n")

    def close(self):
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
    def __init__(self, run_dir: str):
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(os.path.join(run_dir, "tensorboard"))

    def log(self, step, metrics):
        for key, value in metrics.items():
            self._writer.add_scalar(key, value, step)
        self._writer.flush()

    def close(self):
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

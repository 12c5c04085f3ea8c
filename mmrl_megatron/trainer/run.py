"""One training run from a config file and overrides: what launch/train.py calls on every rank.

Order: config and everything checkable without processes (values, the layout as a ParallelDims, data files), so
a mistake costs seconds and every rank fails alike -> processes for that layout -> demo assets -> resolved
config written -> trainer built (resuming when a checkpoint exists) -> loop -> plot -> close.
"""
import logging
import os
from typing import Dict, Iterable, Optional

import torch.distributed as dist

from ..config import Config, ConfigError, load_config, model_shape, save_resolved
from ..models.hf_config import read_hf_config
from ..parallel import ParallelDims
from .demo_assets import DEMO_SHAPE, DemoPlan, plan_demo_assets, prepare_demo_assets

logger = logging.getLogger(__name__)


def check_before_start(config: Config, world_size: int, plan: Optional[DemoPlan]) -> ParallelDims:
    """The layout against the world size and the model's shape (read from config.json, or the demo model's when
    it is about to be built), a named resume checkpoint, every data file not about to be built (exists, is
    parquet, has the required columns), the algorithm names (registered, plug-ins imported) and
    evaluation.metrics (they load, their data sources exist). Raises ConfigError or DataError naming the key or
    file; returns the run's layout, not yet started."""
    from ..algorithms.config_check import check_algorithm_config
    from ..data.source import open_parquet
    from .evaluation import check_evaluation_config

    check_algorithm_config(config)

    shape = DEMO_SHAPE if plan is not None and plan.build_model else model_shape(read_hf_config(config.model.hf_path))
    dims = ParallelDims.from_config(config, world_size, shape)
    if not config.data.train_files:
        raise ConfigError("data.train_files is empty; give the training parquet files, e.g. "
                          "data.train_files=[data/train.parquet]")
    resume = config.trainer.resume
    if resume not in ("auto", "never") and not os.path.isdir(resume):
        raise ConfigError(f"trainer.resume={resume} is not a checkpoint directory; give one (e.g. "
                          "RUN/checkpoints/step_N), or auto (the latest, if any) or never")
    planned = {path for path, _, _ in plan.data_files} if plan is not None else set()
    for path in [*config.data.train_files, *config.data.val_files]:
        if path not in planned:
            open_parquet(path).close()
    check_evaluation_config(config, planned)
    return dims


def run_training(config_path: Optional[str], overrides: Iterable[str] = ()) -> Dict[str, float]:
    """Train to config.trainer.steps (or until a stop is requested); returns the last step's metrics."""
    from .. import parallel
    from .build import build_trainer, close_trainer
    from .plotting import plot_metrics

    config = load_config(config_path, overrides)
    plan = plan_demo_assets(config) if config.trainer.prepare_demo_assets else None
    dims = check_before_start(config, parallel.detect_process_place().world_size, plan)
    device = parallel.pick_device(config.trainer.device)
    parallel.start_processes(dims, device)
    try:
        if plan is not None:
            prepare_demo_assets(config, plan)
        if dist.get_rank() == 0:
            logger.info("resolved config: %s", save_resolved(config, config.trainer.run_dir))
        trainer = build_trainer(config, dims, device)
        try:
            metrics = trainer.run()
        finally:
            close_trainer(trainer)
        metrics_path = os.path.join(config.trainer.run_dir, "metrics.jsonl")
        if dist.get_rank() == 0 and config.logging.plot_at_end and os.path.exists(metrics_path):
            logger.info("curves: %s", plot_metrics(metrics_path, os.path.join(config.trainer.run_dir, "curves.png")))
        return metrics
    finally:
        parallel.shutdown()

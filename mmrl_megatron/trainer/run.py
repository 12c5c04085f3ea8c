"""One training run from a config file and overrides: what launch/train.py calls on every rank.

Order: config (validated before anything starts, so a typo costs seconds) -> processes -> demo assets ->
resolved config written -> trainer built (resuming when a checkpoint exists) -> loop -> plot -> close.
"""
import logging
import os
from typing import Dict, Iterable, Optional

import torch.distributed as dist

from ..config import load_config, save_resolved

logger = logging.getLogger(__name__)


def run_training(config_path: Optional[str], overrides: Iterable[str] = ()) -> Dict[str, float]:
    """Train to config.trainer.steps (or until a stop is requested); returns the last step's metrics."""
    from ..parallel import shutdown
    from .build import build_trainer, close_trainer, start_processes
    from .demo_assets import prepare_demo_assets
    from .plotting import plot_metrics

    config = load_config(config_path, overrides)
    device = start_processes(config)
    try:
        if config.trainer.prepare_demo_assets:
            prepare_demo_assets(config)
        if dist.get_rank() == 0:
            logger.info("resolved config: %s", save_resolved(config, config.trainer.run_dir))
        trainer = build_trainer(config, device)
        try:
            metrics = trainer.run()
        finally:
            close_trainer(trainer)
        metrics_path = os.path.join(config.trainer.run_dir, "metrics.jsonl")
        if dist.get_rank() == 0 and config.logging.plot_at_end and os.path.exists(metrics_path):
            logger.info("curves: %s", plot_metrics(metrics_path, os.path.join(config.trainer.run_dir, "curves.png")))
        return metrics
    finally:
        shutdown()

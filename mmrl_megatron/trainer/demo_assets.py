"""What the CPU demo needs and nothing can download: a tiny Qwen2.5-VL-architecture checkpoint at
model.hf_path and the synthetic counting task at data.train_files / data.val_files.

Built on the first run (trainer.prepare_demo_assets=true) by global rank 0 while the others wait; later
runs find them and build nothing, so a resumed demo trains the same model on the same data. Synthetic data
is written only on the run that also builds the model: once model.hf_path exists, a data file that does not
is a mistyped path (or someone's real data gone missing) and stops the run before it starts, instead of
being silently filled with synthetic rows.
"""
import logging
import os
from dataclasses import dataclass
from typing import Tuple

import torch.distributed as dist

from ..config import ConfigError, ModelShape
from ..models.hf_config import has_hf_config
from ..config.schema import Config

logger = logging.getLogger(__name__)

# Demo widths: big enough to learn the counting task, small enough for a few minutes on 2 CPU cores;
# head width 8 matches tiny.py's M-RoPE sections [2, 1, 1].
DEMO_MODEL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=2, vision_hidden_size=64, vision_intermediate_size=128, vision_num_heads=4,
                  vision_out_hidden_size=64, vision_depth=2)
DEMO_SHAPE = ModelShape(num_layers=DEMO_MODEL["num_hidden_layers"],
                        num_attention_heads=DEMO_MODEL["num_attention_heads"],
                        num_key_value_heads=DEMO_MODEL["num_key_value_heads"])
TRAIN_ROWS, VALIDATION_ROWS = 4096, 128


@dataclass(frozen=True)
class DemoPlan:
    """What this run will build: the model (when model.hf_path has no config.json) and which data files."""

    build_model: bool
    data_files: Tuple[Tuple[str, int, str], ...]  # (path, rows, split)


def plan_demo_assets(config: Config) -> DemoPlan:
    """Decide, before any process starts, what to build; ConfigError for a missing data file that the rule in
    the module docstring does not allow to be built."""
    build_model = not has_hf_config(config.model.hf_path)
    wanted = ((config.data.train_files, TRAIN_ROWS, "train"), (config.data.val_files, VALIDATION_ROWS, "test"))
    missing = tuple((path, rows, split) for files, rows, split in wanted for path in files if not os.path.exists(path))
    if missing and not build_model:
        raise ConfigError(f"data file {missing[0][0]} does not exist; trainer.prepare_demo_assets writes synthetic "
                          f"data only on the run that builds the demo model, and model.hf_path={config.model.hf_path} "
                          "exists: correct the path in data.train_files / data.val_files (or remove model.hf_path "
                          "to rebuild the whole demo)")
    return DemoPlan(build_model, missing)


def _build(config: Config, plan: DemoPlan) -> None:
    from ..data.format import write_rows
    from ..data.synthetic import make_rows
    from ..models.qwen2_5_vl.tiny import build_tiny_checkpoint

    if plan.build_model:
        logger.info("building the tiny demo model at %s", config.model.hf_path)
        build_tiny_checkpoint(config.model.hf_path, seed=config.trainer.seed, **DEMO_MODEL)
    for path, rows, split in plan.data_files:
        logger.warning("writing %d SYNTHETIC %s rows to %s (trainer.prepare_demo_assets)", rows, split, path)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        write_rows(path, make_rows(rows, config.data.seed, split))


def prepare_demo_assets(config: Config, plan: DemoPlan) -> None:
    """Collective: rank 0 builds what `plan` lists, every rank returns once it exists."""
    if dist.get_rank() == 0:
        _build(config, plan)
    dist.barrier()

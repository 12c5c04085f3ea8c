"""What the CPU demo needs and nothing can download: a tiny Qwen2.5-VL-architecture checkpoint at
model.hf_path and the synthetic counting task at data.train_files / data.val_files.

Built on the first run (trainer.prepare_demo_assets=true) by global rank 0 while the others wait; later
runs find them and build nothing, so a resumed demo trains the same model on the same data.
"""
import logging
import os

import torch.distributed as dist

from ..config.schema import Config

logger = logging.getLogger(__name__)

# Demo widths: big enough to learn the counting task, small enough for a few minutes on 2 CPU cores;
# head width 8 matches tiny.py's M-RoPE sections [2, 1, 1].
DEMO_MODEL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=2, vision_hidden_size=64, vision_intermediate_size=128, vision_num_heads=4,
                  vision_out_hidden_size=64, vision_depth=2)
TRAIN_ROWS, VALIDATION_ROWS = 4096, 128


def _build_missing(config: Config) -> None:
    from ..data.format import write_rows
    from ..data.synthetic import make_rows
    from ..models.qwen2_5_vl.tiny import build_tiny_checkpoint

    if not os.path.exists(os.path.join(config.model.hf_path, "config.json")):
        logger.info("building the tiny demo model at %s", config.model.hf_path)
        build_tiny_checkpoint(config.model.hf_path, seed=config.trainer.seed, **DEMO_MODEL)
    for files, rows, split in ((config.data.train_files, TRAIN_ROWS, "train"),
                               (config.data.val_files, VALIDATION_ROWS, "test")):
        for path in files:
            if not os.path.exists(path):
                logger.info("writing %d synthetic %s rows to %s", rows, split, path)
                os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
                write_rows(path, make_rows(rows, config.data.seed, split))


def prepare_demo_assets(config: Config) -> None:
    """Collective: rank 0 builds whatever is missing, every rank returns once it exists."""
    if dist.get_rank() == 0:
        _build_missing(config)
    dist.barrier()

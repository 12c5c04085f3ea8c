"""The one reader of a checkpoint's config.json: every other module receives the dict, or the family's
typed geometry parsed from it (models/family.py).

A model directory is a Hugging Face checkpoint (config.json at its top) or a megatron checkpoint written
by the converters, which keeps the HF side files in `hf/` (convert/checkpoint_io.py).
"""
import json
import os

from ..convert.checkpoint_io import HF_FILES_SUBDIR
from .errors import ModelError

CONFIG_FILE = "config.json"


def hf_config_path(model_dir: str) -> str:
    """model_dir/config.json, or model_dir/hf/config.json for a megatron checkpoint that has one."""
    kept = os.path.join(model_dir, HF_FILES_SUBDIR, CONFIG_FILE)
    top = os.path.join(model_dir, CONFIG_FILE)
    return kept if not os.path.isfile(top) and os.path.isfile(kept) else top


def has_hf_config(model_dir: str) -> bool:
    return os.path.isfile(hf_config_path(model_dir))


def write_hf_config(model_dir: str, config: dict) -> str:
    """Write `config` as model_dir/config.json (the tiny test checkpoints); returns the path."""
    path = os.path.join(model_dir, CONFIG_FILE)
    with open(path, "w") as handle:
        json.dump(config, handle, indent=2)
    return path


def read_hf_config(model_dir: str) -> dict:
    """config.json of a model directory as a dict; ModelError naming the path when missing or not JSON."""
    path = hf_config_path(model_dir)
    if not os.path.isfile(path):
        raise ModelError(f"{path} not found: point model.hf_path at a Hugging Face checkpoint directory (or a "
                         "megatron checkpoint written by hf_to_mcore.py)")
    try:
        with open(path) as handle:
            config = json.load(handle)
    except (OSError, ValueError) as error:
        raise ModelError(f"{path} is not readable JSON ({error}): restore the checkpoint's config.json") from error
    if not isinstance(config, dict):
        raise ModelError(f"{path} holds a {type(config).__name__}, not a JSON object: restore its config.json")
    return config

"""The one place a model is built: a family's megatron module for a config, and for a model directory
(HF checkpoint or megatron checkpoint) with its weights loaded through the family's rule table.

Every function takes the run's parallel.ParallelDims, started (parallel.start_processes), and is called on
every rank: the model is this rank's stage and shards of that layout.
"""
from typing import Mapping, Optional

import torch

from .errors import ModelError
from .family import ROLES, family_for
from .hf_config import read_hf_config


def build_model(model_config, hf_config: Mapping, dims, role: str):
    """This rank's stage of `dims`: "actor"/"reference" end in vocabulary logits, "critic" in scalar values.

    `hf_config` is the checkpoint's config.json as a dict; the family is its model_type unless
    model_config.family names one. The model carries its conversion rules (`rule_table`), which
    convert.iter_hf_tensors applies by default."""
    if role not in ROLES:
        raise ModelError(f"role must be one of {ROLES}, got {role!r}")
    family = family_for(hf_config, getattr(model_config, "family", "auto"))
    geometry = family.geometry(hf_config)
    model = family.build(model_config, geometry, dims, role)
    model.rule_table = family.rule_table(geometry, role)
    model.role = role
    return model


def conversion_table(model):
    """The rule table a built model (a module, or this rank's list of chunks) converts with."""
    from ..convert.model_params import as_chunks

    return as_chunks(model)[0].rule_table


def _build_unloaded_model(model_dir: str, dims, role: str, dtype: Optional[str]):
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from ..config.schema import ModelConfig
    from ..convert.checkpoint_io import checkpoint_dtype, hf_files_dir

    hf_config = read_hf_config(model_dir)
    model_config = ModelConfig(hf_path=hf_files_dir(model_dir), dtype=dtype or checkpoint_dtype(hf_config))
    # Initial values are overwritten by the load; the seed only makes megatron's RNG tracker exist.
    model_parallel_cuda_manual_seed(0)
    return build_model(model_config, hf_config, dims, role)


def build_model_from_dir(model_dir: str, dims, role: str = "actor", device: Optional[torch.device] = None,
                         dtype: Optional[str] = None):
    """This pipeline stage's model for an HF directory or a megatron checkpoint, with its weights loaded
    (`dims`: the started parallel.ParallelDims). `dtype` defaults to the checkpoint's own precision."""
    model = _build_unloaded_model(model_dir, dims, role, dtype)
    if device is not None:
        model.to(device)
    load_model_weights(model, model_dir, dims)
    return model


def build_meta_model(model_dir: str, dims, role: str = "actor"):
    """This pipeline stage's model for either kind of model directory with every tensor on the meta device
    (no memory, nothing loaded): what the streamed conversions fill one chunk at a time (convert/streaming.py)."""
    with torch.device("meta"):
        return _build_unloaded_model(model_dir, dims, role, None)


def load_model_weights(model, model_dir: str, dims) -> None:
    """Fill this rank's shards (of a model built under the parallel.ParallelDims `dims`) from an HF directory or
    a megatron checkpoint (either kind of model_dir)."""
    from ..convert.checkpoint_io import is_mcore_checkpoint, load_mcore_checkpoint
    from ..convert.loader import load_hf_into_model

    if is_mcore_checkpoint(model_dir):
        load_mcore_checkpoint(model, model_dir, dims)
    else:
        load_hf_into_model(model, model_dir, conversion_table(model), dims)

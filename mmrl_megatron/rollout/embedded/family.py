"""What the embedded engine needs from a model family, and which family serves a checkpoint.

The engine (engine.py) and its decode loop (generation.py) never look at a family's modules: they see an
EmbeddedModel. A family module (qwen2_5_vl.py, kimi_vl.py) builds one from a checkpoint directory; its
differences (module tree, checkpoint names, prompt positions, what the KV cache holds) live there.
"""
import importlib
import json
import os
from dataclasses import dataclass
from typing import Callable, List

import torch

from ..errors import RolloutError
from ..types import RolloutRequest
from .forward import CachedDecoder
from .prompts import PreparedPrompt
from .weights import WeightLookup

FAMILIES = {
    "qwen2_5_vl": "mmrl_megatron.rollout.embedded.qwen2_5_vl",
    "kimi_vl": "mmrl_megatron.rollout.embedded.kimi_vl",
}


@dataclass
class EmbeddedModel:
    module: torch.nn.Module  # every weight, in eval mode without gradients; moved whole by release/resume
    decoder: CachedDecoder
    prepare_prompt: Callable[[RolloutRequest, int], PreparedPrompt]  # (request, index); RolloutError if malformed
    weight: WeightLookup  # resolved at each call, so offloading (which swaps storage) leaves nothing stale
    end_of_sequence_ids: List[int]  # config.json's (the engine adds generation_config.json's)
    pixel_dtype: torch.dtype
    cuda_graphs: bool  # whether the decode step may be captured (no data-dependent shapes or host syncs)


def load_embedded_model(hf_dir: str, device: torch.device, dtype: torch.dtype) -> EmbeddedModel:
    """The family of hf_dir/config.json's model_type, built empty on `device` in `dtype`."""
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise RolloutError(f"{path} not found: point model.hf_path at a Hugging Face checkpoint directory")
    with open(path) as handle:
        model_type = json.load(handle).get("model_type")
    if model_type not in FAMILIES:
        raise RolloutError(f"{path} has model_type {model_type!r}; the embedded engine runs {sorted(FAMILIES)}: use "
                           "rollout.backend=sglang for other models")
    return importlib.import_module(FAMILIES[model_type]).load(hf_dir, device, dtype)


def eos_ids(value) -> List[int]:
    """A config's eos_token_id (an int, a list, or None) as a list."""
    return [value] if isinstance(value, int) else list(value or [])

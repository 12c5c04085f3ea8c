"""The embedded engine's transformers model: built empty from config.json, filled under HF checkpoint names.

Checkpoints (and the bridge) use the hub names (`visual.*`, `model.layers.*`, `lm_head.*`); the
transformers>=4.52 module tree nests them (`model.visual.*`, `model.language_model.*`). The two
rename rules below are transformers' own `_checkpoint_conversion_mapping` for Qwen2.5-VL, written
out because transformers 5 buries them in a generic load-time conversion machinery.
"""
import glob
import os
import re
from typing import Dict, Iterator, List, Tuple

import torch

from ..errors import RolloutError

_CHECKPOINT_TO_MODULE = [(re.compile(r"^visual\."), "model.visual."),
                         (re.compile(r"^model\.(?!language_model\.|visual\.)"), "model.language_model.")]


def module_name(checkpoint_name: str) -> str:
    """The parameter name inside Qwen2_5_VLForConditionalGeneration for a checkpoint (hub) name."""
    for pattern, replacement in _CHECKPOINT_TO_MODULE:
        if pattern.match(checkpoint_name):
            return pattern.sub(replacement, checkpoint_name, count=1)
    return checkpoint_name


def build_empty_model(hf_dir: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Qwen2_5_VLForConditionalGeneration from hf_dir/config.json on device, weights left uninitialised.

    Initialisation is skipped because every weight arrives through update_weights; buffers that
    the modules compute in __init__ (rotary frequencies) are still built.
    """
    from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers releases before initialization.py kept it in modeling_utils
        from transformers.modeling_utils import no_init_weights

    config = AutoConfig.from_pretrained(hf_dir)
    if config.model_type != "qwen2_5_vl":
        raise RolloutError(f"{hf_dir}/config.json has model_type {config.model_type!r}; the embedded engine runs "
                           "qwen2_5_vl only: use rollout.backend=sglang for other models")
    with no_init_weights(), torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.tie_weights()
    return model.eval().requires_grad_(False)


def iter_checkpoint_buckets(hf_dir: str, bucket_bytes: int = 1 << 30) -> Iterator[List[Tuple[str, torch.Tensor]]]:
    """The safetensors of hf_dir as buckets of (checkpoint name, CPU tensor) of about bucket_bytes each."""
    from safetensors import safe_open

    files = sorted(glob.glob(os.path.join(hf_dir, "*.safetensors")))
    if not files:
        raise RolloutError(f"no *.safetensors in {hf_dir}: point model.hf_path at a Hugging Face checkpoint directory")
    bucket, size = [], 0
    for path in files:
        with safe_open(path, framework="pt") as handle:
            for name in handle.keys():
                tensor = handle.get_tensor(name)
                bucket.append((name, tensor))
                size += tensor.numel() * tensor.element_size()
                if size >= bucket_bytes:
                    yield bucket
                    bucket, size = [], 0
    if bucket:
        yield bucket


def parameters_by_module_name(model: torch.nn.Module) -> Dict[str, torch.nn.Parameter]:
    """Every parameter under its module name (tied ones under each name); look up with module_name()."""
    return dict(model.named_parameters(remove_duplicate=False))


def copy_into_parameter(parameters: Dict[str, torch.nn.Parameter], checkpoint_name: str, tensor: torch.Tensor) -> None:
    """In-place copy (parameter storage, hence captured CUDA graphs, stay valid)."""
    target = parameters.get(module_name(checkpoint_name))
    if target is None:
        raise RolloutError(f"engine has no parameter for tensor {checkpoint_name!r}: send Hugging Face checkpoint "
                           "names (visual.*, model.layers.*, lm_head.weight)")
    if target.shape != tensor.shape:
        raise RolloutError(f"tensor {checkpoint_name!r} has shape {tuple(tensor.shape)}, the engine expects "
                           f"{tuple(target.shape)}: the engine's config.json and the sender's model differ")
    target.data.copy_(tensor)

"""The embedded engine's weights: filled in place under the checkpoint's own (Hugging Face) names.

A family (models/<family>/embedded.py) answers which engine tensor holds a checkpoint tensor; the copy and
the checks here are the same for all of them. Checkpoint files stream through the same path (load_checkpoint).
"""
import glob
import os
from typing import Iterator, List, Tuple

import torch

from ...models.common.embedded import WeightLookup
from ..errors import RolloutError


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


def copy_into_weight(lookup: WeightLookup, checkpoint_name: str, tensor: torch.Tensor) -> None:
    """In-place copy (parameter storage, hence captured CUDA graphs, stay valid); call under no_grad."""
    target = lookup(checkpoint_name)
    if target is None:
        raise RolloutError(f"engine has no parameter for tensor {checkpoint_name!r}: send the checkpoint's own "
                           "Hugging Face names (as in its safetensors)")
    if target.shape != tensor.shape:
        raise RolloutError(f"tensor {checkpoint_name!r} has shape {tuple(tensor.shape)}, the engine expects "
                           f"{tuple(target.shape)}: the engine's config.json and the sender's model differ")
    target.copy_(tensor)

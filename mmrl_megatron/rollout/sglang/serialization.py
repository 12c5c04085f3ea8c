"""Serialized weight buckets for `/update_weights_from_tensor` (load_format "flattened_bucket").

SGLang's own helpers are used when sglang is importable (the production image):
`sglang.srt.utils.MultiprocessingSerializer` and `sglang.srt.weight_sync.tensor_bucket.FlattenedTensorBucket`.
A real server unpickles payloads with an allow-list that admits its own FlattenedTensorMetadata
class, so production payloads must be built by those classes.

Without sglang (CI, CPU machines) this module builds the same wire format itself: the bucket is a
dict {"flattened_tensor": uint8 tensor, "metadata": [FlattenedTensorMetadata(name, shape, dtype,
start_idx, end_idx, numel)]} pickled with multiprocessing's ForkingPickler (so CUDA tensors travel as
CUDA-IPC handles and CPU tensors as shared memory) and base64-encoded. The fallback's metadata class
lives in this module, so only the contract tests' fake server (which imports it) can read it.
"""
import base64
import io
import pickle
from dataclasses import dataclass
from multiprocessing.reduction import ForkingPickler
from typing import List, Sequence, Tuple

import torch

from .optional_sglang import sglang_attribute

NamedTensors = List[Tuple[str, torch.Tensor]]

# production: the pinned sglang's helpers
_SGLangSerializer = sglang_attribute("sglang.srt.utils", "MultiprocessingSerializer")
_SGLangBucket = sglang_attribute("sglang.srt.weight_sync.tensor_bucket", "FlattenedTensorBucket")
USING_SGLANG_HELPERS = _SGLangSerializer is not None and _SGLangBucket is not None


@dataclass
class FlattenedTensorMetadata:
    """Where one tensor sits in a flattened bucket; the attributes SGLang's loader reads."""

    name: str
    shape: torch.Size
    dtype: torch.dtype
    start_idx: int
    end_idx: int
    numel: int


def _flatten(named_tensors: Sequence[Tuple[str, torch.Tensor]]) -> dict:
    # Hand-written only for machines without sglang.
    metadata, parts, offset = [], [], 0
    for name, tensor in named_tensors:
        flat = tensor.detach().contiguous().view(-1).view(torch.uint8)
        metadata.append(
            FlattenedTensorMetadata(name, tensor.shape, tensor.dtype, offset, offset + flat.numel(), tensor.numel())
        )
        parts.append(flat)
        offset += flat.numel()
    flattened = torch.cat(parts) if parts else torch.empty(0, dtype=torch.uint8)
    return {"flattened_tensor": flattened, "metadata": metadata}


def split_by_dtype(named_tensors: Sequence[Tuple[str, torch.Tensor]]) -> List[NamedTensors]:
    """Single-dtype sub-buckets, in first-seen order: a flattened bucket is viewed back per dtype,
    which needs every tensor's byte offset to be a multiple of its element size (slime, too, sends
    one flattened bucket per dtype)."""
    groups = {}
    for name, tensor in named_tensors:
        groups.setdefault(tensor.dtype, []).append((name, tensor))
    return list(groups.values())


def serialize_bucket(named_tensors: Sequence[Tuple[str, torch.Tensor]]) -> str:
    """One engine TP rank's payload entry: a single-dtype bucket flattened and serialized to base64.

    The tensors (and the flattened copy, which shares nothing with them) must stay alive until the
    server has answered the update request: the payload holds handles, not bytes.
    """
    if len({tensor.dtype for _, tensor in named_tensors}) > 1:
        raise ValueError("serialize_bucket takes one dtype per bucket; split the bucket with split_by_dtype")
    if USING_SGLANG_HELPERS:
        bucket = _SGLangBucket(named_tensors=list(named_tensors))
        payload = {"flattened_tensor": bucket.get_flattened_tensor(), "metadata": bucket.get_metadata()}
        return _SGLangSerializer.serialize(payload, output_str=True)
    buffer = io.BytesIO()
    ForkingPickler(buffer).dump(_flatten(named_tensors))
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def deserialize_bucket(serialized: str) -> NamedTensors:
    """Inverse of serialize_bucket (what the server does with its own rank's entry)."""
    if USING_SGLANG_HELPERS:
        payload = _SGLangSerializer.deserialize(serialized)
    else:
        payload = pickle.loads(base64.b64decode(serialized))
    flattened = payload["flattened_tensor"]
    return [
        (meta.name, flattened[meta.start_idx : meta.end_idx].view(meta.dtype).reshape(meta.shape))
        for meta in payload["metadata"]
    ]


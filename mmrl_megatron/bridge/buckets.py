"""Group a stream of named tensors into buckets of bounded size, the unit an engine loads at once."""
from typing import Iterable, Iterator, List, Tuple

import torch

NamedTensor = Tuple[str, torch.Tensor]


def tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def bucket_by_bytes(named_tensors: Iterable[NamedTensor], bucket_bytes: int) -> Iterator[List[NamedTensor]]:
    """Yield consecutive lists of (name, tensor) whose sizes add up to at most `bucket_bytes`.

    A tensor larger than `bucket_bytes` travels alone in its own bucket (splitting a tensor would
    make the engine reassemble it). Order is preserved and nothing is held beyond one bucket."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    bucket: List[NamedTensor] = []
    filled = 0
    for name, tensor in named_tensors:
        size = tensor_bytes(tensor)
        if bucket and filled + size > bucket_bytes:
            yield bucket
            bucket, filled = [], 0
        bucket.append((name, tensor))
        filled += size
    if bucket:
        yield bucket

"""Copies between host and GPU that never stall the GPU stream.

A copy from ordinary (pageable) host memory waits until the GPU has finished the work queued before it, so
each one in a forward or backward costs a pipeline drain (torch.cuda.set_sync_debug_mode flags them).
Through pinned memory the copy is queued like a kernel; torch's caching host allocator reuses the pinned
blocks and keeps each alive until its copy has run.
"""
from typing import Callable

import torch


def to_device(tensor: torch.Tensor, device) -> torch.Tensor:
    """`tensor` on `device`, queued without waiting when it goes from the host to a GPU."""
    device = torch.device(device)
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    if torch.cuda.is_current_stream_capturing():
        # a captured copy would read this pinned block again at every replay, after the allocator reused it
        raise RuntimeError("a host-to-device copy inside a CUDA-graph capture (trainer/update_graphs.py)")
    return tensor.pin_memory().to(device, non_blocking=True)


def to_host(tensor: torch.Tensor) -> Callable[[], list]:
    """`tensor`'s values on their way to the host: returns a function that waits for this copy only (not for
    work queued after it) and gives them as a list. From a GPU the copy is queued into pinned memory."""
    if tensor.device.type != "cuda":
        values = tensor.tolist()
        return lambda: values
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record()

    def wait() -> list:
        copied.synchronize()
        return host.tolist()

    return wait

"""Host-to-device copies that never stall the GPU stream.

A copy from ordinary (pageable) host memory waits until the GPU has finished the work queued before it, so
each one in a forward or backward costs a pipeline drain (torch.cuda.set_sync_debug_mode flags them).
Through pinned memory the copy is queued like a kernel; torch's caching host allocator reuses the pinned
blocks and keeps each alive until its copy has run.
"""
import torch


def to_device(tensor: torch.Tensor, device) -> torch.Tensor:
    """`tensor` on `device`, queued without waiting when it goes from the host to a GPU."""
    device = torch.device(device)
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)

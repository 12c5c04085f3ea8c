"""Let megatron-core run on CPU ranks (gloo) by redirecting its hard-coded CUDA calls.

megatron-core 0.16.1 assumes CUDA in a few places (RNG tracker, pipeline token counters, p2p
shape exchange, optimizer scalars, gradient-sync streams). The product runs on one CPU too (the
README's demo and every test), so the redirection lives here and is switched on only when the run's
device is the CPU; on a GPU nothing is touched. When a megatron-core upgrade moves these calls,
this file is the one place to change (shared/reference/megatron_cpu.md lists what was seen).
"""
import contextlib
import functools

import torch

_FACTORIES = ("zeros", "ones", "empty", "full", "tensor", "arange", "randn", "rand")
_enabled = False


class _CpuStream:
    """Stands in for torch.cuda.Stream: work on the CPU is already ordered."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, other):
        pass

    def synchronize(self):
        pass

    def record_event(self, event=None):
        return event


def _is_cuda(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return isinstance(device, str) and device.startswith("cuda")


def _cpu_factory(factory):
    @functools.wraps(factory)
    def wrapper(*args, **kwargs):
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        return factory(*args, **kwargs)

    return wrapper


def enable_cpu_execution() -> None:
    """Redirect megatron-core's CUDA calls to the CPU for this process (idempotent)."""
    global _enabled
    if _enabled or torch.cuda.is_available():
        return
    _enabled = True
    cpu = torch.device("cpu")
    torch.cuda.current_device = lambda: cpu
    torch.cuda.get_rng_state = lambda device=None: torch.get_rng_state()
    torch.cuda.set_rng_state = lambda state, device=None: torch.set_rng_state(state)
    torch.cuda.random.get_rng_state = torch.cuda.get_rng_state
    torch.cuda.random.set_rng_state = torch.cuda.set_rng_state
    torch.cuda.manual_seed = lambda seed: None
    torch.cuda.synchronize = lambda device=None: None
    torch.cuda.current_stream = lambda device=None: _CpuStream()
    torch.cuda.default_stream = lambda device=None: _CpuStream()
    torch.cuda.Stream = _CpuStream
    torch.cuda.stream = lambda stream=None: contextlib.nullcontext()
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    torch.Tensor.record_stream = lambda self, stream: None
    # torch's device context (`with torch.device("meta")`, used to build a model without memory) recognises
    # factories by identity in a set it caches on first use; filled after the wrapping below, it would hold
    # the wrappers, which never reach it, and the context would be ignored. Fill it with the originals.
    from torch.utils._device import _device_constructors

    _device_constructors()
    for name in _FACTORIES:
        setattr(torch, name, _cpu_factory(getattr(torch, name)))

    from megatron.core.tensor_parallel import random as megatron_random

    megatron_random._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    megatron_random._set_cuda_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)

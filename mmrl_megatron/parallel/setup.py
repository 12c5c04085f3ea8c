"""Start a run's processes: the device, torch.distributed and megatron-core's groups, in one call."""
import os
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

from .dims import ParallelDims
from .launcher_env import ProcessPlace, detect_process_place


def pick_device(requested: str = "auto") -> torch.device:
    """CUDA when available (or asked for), else the CPU; the backend follows the device."""
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % max(torch.cuda.device_count(), 1))
    return torch.device("cpu")


def _join_job(device: torch.device, timeout_minutes: int = 30) -> ProcessPlace:
    """Join the job's process group (NCCL on GPU, gloo on CPU); a no-op if already joined."""
    place = detect_process_place()
    # NVLink multicast (NVLS) is off: it reserves GPU memory per communicator and is not needed here.
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    if dist.is_initialized():
        return place
    if device.type == "cuda":  # "cuda" without an index is the current device
        torch.cuda.set_device(device if device.index is not None else torch.cuda.current_device())
    os.environ.setdefault("MASTER_ADDR", place.master_addr)
    os.environ.setdefault("MASTER_PORT", str(place.master_port))
    dist.init_process_group(
        backend="nccl" if device.type == "cuda" else "gloo",
        init_method=f"tcp://{place.master_addr}:{place.master_port}" if place.launcher != "torchrun" else "env://",
        rank=place.rank,
        world_size=place.world_size,
        timeout=timedelta(minutes=timeout_minutes),
    )
    return place


def seed_ranks(seed: int) -> None:
    """The same CPU generator on every rank (replicated weights initialise alike on every tensor-parallel rank),
    then megatron-core's per-rank streams (dropout, tensor-parallel initialisation); after the groups exist."""
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def start_processes(dims: ParallelDims, device: torch.device, seed: Optional[int] = None) -> ParallelDims:
    """How every entry point (training, scoring, the converters, the benchmarks) starts: on the CPU redirect
    megatron-core's CUDA calls (cpu_support.py), join the job (a single process when no launcher started it),
    create megatron-core's groups for `dims` (replacing any this process had) and, given `seed`, seed_ranks.
    Every rank calls it; returns `dims`, now holding its groups."""
    if device.type == "cpu":
        from .cpu_support import enable_cpu_execution

        enable_cpu_execution()
    _join_job(device)
    dims._create_groups()
    if seed is not None:
        seed_ranks(seed)
    return dims


def shutdown() -> None:
    """Destroy megatron-core's groups and leave the job (what start_processes made), if they exist."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()

"""Start torch.distributed and megatron-core's TP/PP/CP/EP/DP groups for one run."""
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .launcher_env import ProcessPlace, detect_process_place


@dataclass(frozen=True)
class ParallelLayout:
    """The run's parallel sizes, validated by config.validate_layout before construction."""

    tensor: int = 1
    pipeline: int = 1
    context: int = 1
    expert: int = 1
    expert_tensor: int = 1
    data: int = 1

    @property
    def world_size(self) -> int:
        return self.tensor * self.pipeline * self.context * self.data


def layout_from_config(config, world_size: int, shape) -> ParallelLayout:
    """The validated layout for `config` (a config.Config) on `world_size` ranks; raises ConfigError naming the key."""
    from ..config.validate import validate_layout

    data = validate_layout(config, world_size, shape)
    p = config.parallel
    return ParallelLayout(tensor=p.tensor, pipeline=p.pipeline, context=p.context, expert=p.expert,
                          expert_tensor=p.expert_tensor or p.tensor, data=data)


def pick_device(requested: str = "auto") -> torch.device:
    """CUDA when available (or asked for), else the CPU; the backend follows the device."""
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % max(torch.cuda.device_count(), 1))
    return torch.device("cpu")


def init_distributed(device: torch.device, timeout_minutes: int = 30) -> ProcessPlace:
    """Join the job's process group (NCCL on GPU, gloo on CPU); a no-op if already joined."""
    place = detect_process_place()
    # NVLink multicast (NVLS) is off: it reserves GPU memory per communicator and is not needed here.
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    if dist.is_initialized():
        return place
    if device.type == "cuda":
        torch.cuda.set_device(device)
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


def init_model_parallel(layout: ParallelLayout) -> None:
    """Create megatron-core's groups; call after init_distributed on every rank."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tensor,
        pipeline_model_parallel_size=layout.pipeline,
        context_parallel_size=layout.context,
        expert_model_parallel_size=layout.expert,
        expert_tensor_parallel_size=layout.expert_tensor,
    )


def shutdown() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()

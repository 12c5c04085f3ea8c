"""This rank's parameters under global Megatron names, with their tensor-parallel layout."""
import re
from dataclasses import dataclass
from typing import Iterator, List, Optional

import torch


def unwrap(chunk):
    """The model inside DDP / Float16Module wrappers."""
    while hasattr(chunk, "module") and isinstance(chunk.module, torch.nn.Module):
        chunk = chunk.module
    return chunk

def as_chunks(model) -> List[torch.nn.Module]:
    return [unwrap(chunk) for chunk in (model if isinstance(model, (list, tuple)) else [model])]

def _global_name(model: torch.nn.Module, local_name: str) -> str:
    """Replace each `layers.<local index>` with the layer's global index (megatron-core's layer_number is
    global and 1-based across pipeline stages and virtual stages)."""
    parts, cursor = [], 0
    for found in re.finditer(r"layers\.(\d+)\.", local_name):
        layer = model.get_submodule(local_name[:found.end() - 1])
        index = layer.layer_number - 1 if hasattr(layer, "layer_number") else int(found.group(1))
        parts.append(local_name[cursor:found.start()] + f"layers.{index}.")
        cursor = found.end()
    return "".join(parts) + local_name[cursor:]

@dataclass
class ShardedParam:
    name: str  # global Megatron name
    param: torch.nn.Parameter
    axis: Optional[int]  # partition dim, None when replicated over the group
    group: object  # the process group its shards are spread over (None: not split)

    @property
    def rank(self) -> int:
        return 0 if self.group is None else torch.distributed.get_rank(self.group)

    @property
    def size(self) -> int:
        return 1 if self.group is None else torch.distributed.get_world_size(self.group)

def is_routed_expert(name: str) -> bool:
    """Whether a megatron name (parameter or checkpoint key) belongs to a routed expert: those are split
    over the expert-tensor-parallel group, not the tensor-parallel one (shared experts are not routed)."""
    return ".mlp.experts." in name


def _split_group(param):
    """Expert weights (megatron marks them allreduce=False) split over the expert-TP group, others over TP."""
    from megatron.core import parallel_state

    if not getattr(param, "allreduce", True):
        return parallel_state.get_expert_tensor_parallel_group()
    return parallel_state.get_tensor_model_parallel_group()

def sharded_params(model) -> Iterator[ShardedParam]:
    for chunk in as_chunks(model):
        for local_name, param in chunk.named_parameters():
            split = getattr(param, "tensor_model_parallel", False)
            group = _split_group(param) if split else None
            if group is not None and torch.distributed.get_world_size(group) == 1:
                group = None
            yield ShardedParam(_global_name(chunk, local_name), param,
                               param.partition_dim if group is not None else None, group)

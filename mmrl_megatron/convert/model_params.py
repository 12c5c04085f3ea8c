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

# a routed expert's local id: SequentialMLP's `local_experts.<id>.`, TEGroupedMLP's `linear_fc<k>.weight<id>`
_LOCAL_EXPERT = re.compile(r"(local_experts\.)(\d+)(\.)|(experts\.linear_fc[12]\.weight)(\d+)()$")


def _global_experts(model: torch.nn.Module, local_name: str, global_name: str) -> str:
    """Replace a routed expert's local id with its global one: the MoE layer's local_expert_indices (megatron
    offsets them by expert-parallel rank * experts per rank)."""
    moe = model.get_submodule(local_name[:local_name.index(".experts.")])
    first = moe.local_expert_indices[0]

    def offset(found):
        prefix, index, suffix = (found.group(1), found.group(2), found.group(3)) if found.group(1) else (
            found.group(4), found.group(5), found.group(6))
        return f"{prefix}{int(index) + first}{suffix}"

    return _LOCAL_EXPERT.sub(offset, global_name)


def _global_name(model: torch.nn.Module, local_name: str) -> str:
    """Replace each `layers.<local index>` with the layer's global index (megatron-core's layer_number is
    global and 1-based across pipeline stages and virtual stages), and a routed expert's local id with its
    global id."""
    parts, cursor = [], 0
    for found in re.finditer(r"layers\.(\d+)\.", local_name):
        layer = model.get_submodule(local_name[:found.end() - 1])
        index = layer.layer_number - 1 if hasattr(layer, "layer_number") else int(found.group(1))
        parts.append(local_name[cursor:found.start()] + f"layers.{index}.")
        cursor = found.end()
    name = "".join(parts) + local_name[cursor:]
    return _global_experts(model, local_name, name) if is_routed_expert(local_name) else name

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


def _split_group(name: str, dims):
    """Routed experts' weights split over the expert-TP group, others over TP (None: not split here)."""
    if is_routed_expert(name):
        return dims.expert_tensor_group if dims.expert_tensor > 1 else None
    return dims.tensor_group if dims.tensor > 1 else None


def sharded_params(model, table, dims) -> Iterator[ShardedParam]:
    """This rank's tensors under global names: every parameter, and the buffers `table` converts (rules with
    buffer=True); the split axis is the rule's split_axis where it sets one, else the parameter's partition_dim.
    `dims`: the parallel.ParallelDims the model was built under (its tensor-parallel groups)."""
    for chunk in as_chunks(model):
        buffers = [item for item in chunk.named_buffers() if table.has_buffers()]
        for local_name, param in list(chunk.named_parameters()) + buffers:
            name = _global_name(chunk, local_name)
            found = table.match(name)
            rule = table.rules[found[0]] if found is not None else None
            if not isinstance(param, torch.nn.Parameter) and (rule is None or not rule.buffer):
                continue
            split = getattr(param, "tensor_model_parallel", False)
            group = _split_group(name, dims) if split else None
            axis = None
            if group is not None:
                axis = rule.split_axis if rule is not None and rule.split_axis is not None else param.partition_dim
            yield ShardedParam(name, param, axis, group)

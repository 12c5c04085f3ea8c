"""Megatron shards -> full HF-named tensors on every rank (the weight bridge's and exporter's source).

One collective over the tensor-, pipeline- and expert-parallel groups: the rank holding a parameter gathers
its shards over TP (expert TP for routed experts) and converts them, then broadcasts the HF tensors to the
other stages (and, under expert parallelism, to every rank). Ranks learn
which stage holds what (names, shapes, dtypes) in one all_gather_object up front, so every rank walks
the same fixed order: the rule table's.
"""
from typing import Dict, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist

from .model_params import ShardedParam, as_chunks, sharded_params
from .rules import RuleTable
from .streaming import is_placeholder

Key = Tuple[int, Tuple[Tuple[str, int], ...]]  # rule index, placeholder values


def _key(index: int, values: Dict[str, int]) -> Key:
    return index, tuple(sorted(values.items()))


def _gather_shards(sharded: ShardedParam) -> List[torch.Tensor]:
    local = sharded.param.detach()
    if sharded.group is None:
        return [local]
    shards = [torch.empty_like(local) for _ in range(sharded.size)]
    dist.all_gather(shards, local.contiguous(), group=sharded.group)
    return shards


def _hf_metadata(table, index: int, values, sharded: ShardedParam) -> List[Tuple[str, tuple, torch.dtype]]:
    """HF names, shapes, dtypes this parameter exports to, computed on meta tensors (no data moved)."""
    meta = [torch.empty(sharded.param.shape, dtype=sharded.param.dtype, device="meta")] * sharded.size
    rule = table.rules[index]
    outputs = rule.transform.to_hf(meta, sharded.axis)
    return [(name, tuple(t.shape), t.dtype) for name, t in zip(rule.hf_names(values), outputs)]


def _owner_group(dims):
    """The ranks among which each exported tensor has one owner that broadcasts it: the pipeline stages, or
    every rank under expert parallelism (expert-parallel ranks hold different experts); None: no broadcast."""
    if dims.expert > 1:
        return dist.group.WORLD
    return dims.pipeline_group if dims.pipeline > 1 else None


def iter_hf_tensors(model, dims, table: Optional[RuleTable] = None) -> Iterator[Tuple[str, torch.Tensor]]:
    """(HF name, full tensor) for every exported weight, in the rule table's order, on every rank.

    `model`: this rank's module or list of chunks (DDP/Float16Module wrappers are unwrapped); `dims`: the
    parallel.ParallelDims it was built under; `table`: the family's rules, by default the table
    models.build_model recorded on the model (`rule_table`).
    Collective over TP, PP and EP: all ranks of the model-parallel group iterate to the end together.
    Tied output layers are emitted once, as the embedding; vocabulary padding is removed; tensors keep the
    parameters' dtype. Tensors on the meta device (outside a streamed conversion's current chunk,
    streaming.py) are not exported."""
    table = table or as_chunks(model)[0].rule_table
    local: Dict[Key, ShardedParam] = {}
    metadata: Dict[Key, list] = {}
    for sharded in sharded_params(model, table, dims):
        found = table.match(sharded.name)
        if found is None or not table.rules[found[0]].export or is_placeholder(sharded.param):
            continue
        key = _key(*found)
        local[key] = sharded
        metadata[key] = _hf_metadata(table, found[0], found[1], sharded)
    owner_group = _owner_group(dims)
    owners: Dict[Key, int] = {}
    if owner_group is not None:
        # the first rank (in group order) holding a tensor sends it; every rank computes the same owners
        everyone = [None] * dist.get_world_size(owner_group)
        dist.all_gather_object(everyone, (dist.get_rank(), metadata), group=owner_group)
        for global_rank, stage_metadata in everyone:
            for key, entries in stage_metadata.items():
                owners.setdefault(key, global_rank)
                metadata.setdefault(key, entries)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    for index, values in table.ordered_instances():
        key = _key(index, values)
        if key not in metadata:
            continue
        if key in local:
            sharded = local[key]
            tensors = [t.contiguous() for t in table.rules[index].transform.to_hf(_gather_shards(sharded), sharded.axis)]
        else:
            tensors = [torch.empty(shape, dtype=dtype, device=device) for _, shape, dtype in metadata[key]]
        if owner_group is not None:
            for tensor in tensors:
                dist.broadcast(tensor, src=owners[key], group=owner_group)
        for (name, _, _), tensor in zip(metadata[key], tensors):
            yield name, tensor

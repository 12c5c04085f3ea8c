"""The training processes that share one SGLang server: one rollout tensor-parallel group.

Groups are `tensor_parallel` consecutive local ranks of one node (torchrun numbers a node's ranks
contiguously); the lowest is the leader, which alone talks HTTP to the server. Every SGLangEngine
call is collective over its group: members hand their inputs to the leader and get their share of
the answer back, so a server failure is seen, and recovered from, in one place. Without
torch.distributed the process is a group of one.
"""
import os
from typing import Any, List, Optional

import torch
import torch.distributed as dist

from ..errors import RolloutError


class RolloutGroup:
    def __init__(self, engine_tensor_parallel: int, device: Optional[torch.device] = None):
        self.engine_tensor_parallel = engine_tensor_parallel
        self.process_group = None
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            self.size, self.rank_in_group, self.index = 1, 0, 0
            self.base_gpu_id = device.index if device is not None and device.index is not None else 0
            return
        world_size, rank = dist.get_world_size(), dist.get_rank()
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        if local_world_size % engine_tensor_parallel:
            raise RolloutError(
                f"rollout.sglang.tensor_parallel={engine_tensor_parallel} does not divide the "
                f"{local_world_size} processes per node; pick a divisor so each server sits on one node"
            )
        self.size = engine_tensor_parallel
        self.rank_in_group = local_rank % engine_tensor_parallel
        self.index = rank // engine_tensor_parallel
        self.base_gpu_id = local_rank - self.rank_in_group
        # new_group is collective over the world: every rank creates every group, in the same order
        for start in range(0, world_size, engine_tensor_parallel):
            members = list(range(start, start + engine_tensor_parallel))
            group = dist.new_group(members, backend="gloo")
            if rank in members:
                self.process_group = group
        self._leader_global_rank = rank - self.rank_in_group

    @property
    def is_leader(self) -> bool:
        return self.rank_in_group == 0

    def gather_to_leader(self, value: Any) -> Optional[List[Any]]:
        """Every member's value, in group order, on the leader; None on the others."""
        if self.size == 1:
            return [value]
        gathered = [None] * self.size if self.is_leader else None
        dist.gather_object(value, gathered, dst=self._leader_global_rank, group=self.process_group)
        return gathered

    def broadcast_from_leader(self, value: Any) -> Any:
        if self.size == 1:
            return value
        holder = [value]
        dist.broadcast_object_list(holder, src=self._leader_global_rank, group=self.process_group)
        return holder[0]

    def scatter_from_leader(self, values: Optional[List[Any]]) -> Any:
        """Member i receives values[i] (values is read on the leader only)."""
        if self.size == 1:
            return values[0]
        received = [None]
        dist.scatter_object_list(received, values, src=self._leader_global_rank, group=self.process_group)
        return received[0]

    def run_on_leader(self, action, *args) -> Any:
        """Run action on the leader and return its result everywhere; a RolloutError there is raised on every member."""
        outcome = None
        if self.is_leader:
            try:
                outcome = ("ok", action(*args))
            except RolloutError as error:
                outcome = ("error", str(error))
        outcome = self.broadcast_from_leader(outcome)
        if outcome[0] == "error":
            raise RolloutError(outcome[1])
        return outcome[1]

"""The trainer's end of the process group that `/init_weights_update_group` opens on a server.

The server joins as ranks rank_offset.. with sglang's `init_custom_process_group` (a TCP rendezvous
at master_address:master_port, keys under PrefixStore(group_name), then torch's process-group
helper); the trainer is rank 0 and hosts the store. The trainer side must build its group the same
way or the two never meet: with sglang importable we call that very function; without it (CI) we do
the same steps with torch's helper, which is what the contract tests' fake server mirrors.
"""
from datetime import timedelta
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import PrefixStore, _new_process_group_helper, _world

from .optional_sglang import sglang_attribute

_sglang_init_group = sglang_attribute("sglang.srt.utils", "init_custom_process_group")


class UpdateGroup(NamedTuple):
    process_group: Any
    store: Any  # the rendezvous store this rank hosts; kept alive as long as the group


def open_update_group(
    master_address: str, master_port: int, world_size: int, group_name: str, backend: str, timeout_s: float
) -> UpdateGroup:
    """Rank 0 of a fresh process group that does not touch torch.distributed's default group."""
    timeout = timedelta(seconds=timeout_s)
    if _sglang_init_group is not None:
        group = _sglang_init_group(
            backend=backend,
            init_method=f"tcp://{master_address}:{master_port}",
            timeout=timeout,
            world_size=world_size,
            rank=0,
            group_name=group_name,
        )
        return UpdateGroup(group, None)
    store = dist.TCPStore(master_address, master_port, world_size, is_master=True, timeout=timeout)
    # torch's private helper is the only way to build a group outside the default one; sglang uses it too
    group, _ = _new_process_group_helper(
        world_size, 0, [], backend, PrefixStore(group_name, store), group_name=group_name, timeout=timeout
    )
    _world.pg_group_ranks[group] = {rank: rank for rank in range(world_size)}
    return UpdateGroup(group, store)


def broadcast_tensor(group: UpdateGroup, tensor: torch.Tensor) -> None:
    """Send one tensor from rank 0 (the trainer) to every server rank of the group."""
    dist.broadcast(tensor, src=0, group=group.process_group)


def close_update_group(group: UpdateGroup) -> None:
    dist.destroy_process_group(group.process_group)

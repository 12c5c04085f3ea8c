"""The trainer's end of the process group that `/init_weights_update_group` opens on a server.

The server joins as ranks rank_offset.. with sglang's `init_custom_process_group` (a TCP rendezvous
at master_address:master_port, keys under PrefixStore(group_name), then torch's process-group
helper); the trainer is rank 0 and hosts the store, listening on the configured address only. The
trainer side must build its group the same way or the two never meet: with sglang importable we hand
our store to that very function; without it (CI) we do the same steps with torch's helper, which is
what the contract tests' fake server mirrors.
"""
import socket
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


def listening_socket(address: str) -> socket.socket:
    """A socket listening on `address` alone, on a free port: the store's endpoint, bound before the
    port is announced to the server so that no other process can take it in between."""
    listener = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_STREAM)
    listener.bind((address, 0))
    listener.listen()
    return listener


def open_update_group(
    listener: socket.socket, world_size: int, group_name: str, backend: str, timeout_s: float
) -> UpdateGroup:
    """Rank 0 of a fresh process group that does not touch torch.distributed's default group.

    The store serves on `listener` (bound to the configured address): a TCPStore given only a host
    and port listens on every interface, and anyone who reaches it could join the group and feed
    the broadcast. The store takes over the socket."""
    timeout = timedelta(seconds=timeout_s)
    address, port = listener.getsockname()[:2]
    store = dist.TCPStore(address, port, world_size, is_master=True, timeout=timeout,
                          master_listen_fd=listener.detach(), use_libuv=True)
    prefixed = PrefixStore(group_name, store)  # the key layout the servers' init_custom_process_group uses
    if _sglang_init_group is not None:
        group = _sglang_init_group(backend=backend, store=prefixed, timeout=timeout, world_size=world_size,
                                   rank=0, group_name=group_name)
        return UpdateGroup(group, store)
    # torch's private helper is the only way to build a group outside the default one; sglang uses it too
    group, _ = _new_process_group_helper(world_size, 0, [], backend, prefixed, group_name=group_name, timeout=timeout)
    _world.pg_group_ranks[group] = {rank: rank for rank in range(world_size)}
    return UpdateGroup(group, store)


def broadcast_tensor(group: UpdateGroup, tensor: torch.Tensor) -> None:
    """Send one tensor from rank 0 (the trainer) to every server rank of the group."""
    dist.broadcast(tensor, src=0, group=group.process_group)


def close_update_group(group: UpdateGroup) -> None:
    dist.destroy_process_group(group.process_group)

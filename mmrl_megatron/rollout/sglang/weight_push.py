"""Leader-side pushes of one weight bucket into an SGLang server, by the two protocols it offers.

- TensorPush (colocated): each engine TP rank gets its own serialized flattened bucket (CUDA-IPC
  handles to tensors on that rank's GPU) in one `/update_weights_from_tensor` request.
- DistributedPush (disaggregated): `/update_weights_from_distributed` announces names, dtypes and
  shapes; the server then receives each tensor by a broadcast from the trainer (rank 0 of a group
  opened once through `/init_weights_update_group`).

Both run inside the session SGLang 0.5.23 requires: prepare() first (outside the session), then
begin_session() before the first bucket and end_session() (which also flushes the prefix cache,
now stale) after the last.
"""
from concurrent.futures import ThreadPoolExecutor
from typing import List, Optional, Sequence, Tuple

import torch

from ...config.schema import SGLangConfig
from ..errors import RolloutError
from .client import SGLangClient
from .payloads import distributed_update_payload, init_group_payload, tensor_update_payload
from .protocol import DEFAULT_WEIGHT_UPDATE_GROUP
from .update_group import UpdateGroup, broadcast_tensor, close_update_group, listening_socket, open_update_group

NamedTensors = List[Tuple[str, torch.Tensor]]


def begin_session(client: SGLangClient) -> None:
    client.begin_weight_update()


def end_session(client: SGLangClient) -> None:
    client.end_weight_update()
    client.flush_cache()


class TensorPush:
    def __init__(self, engine_tensor_parallel: int):
        self.engine_tensor_parallel = engine_tensor_parallel

    def prepare(self, client: SGLangClient) -> None:
        pass

    def push(self, client: SGLangClient, serialized_per_engine_rank: Sequence[str], weight_version: str) -> None:
        """One serialized bucket per engine TP rank (each is unpickled once: handles are single-use)."""
        if len(serialized_per_engine_rank) != self.engine_tensor_parallel:
            raise RolloutError(
                f"{len(serialized_per_engine_rank)} serialized buckets for an SGLang server with "
                f"{self.engine_tensor_parallel} TP ranks"
            )
        client.update_weights_from_tensor(tensor_update_payload(serialized_per_engine_rank, weight_version))

    def close(self, client: Optional[SGLangClient]) -> None:
        pass


class DistributedPush:
    def __init__(self, config: SGLangConfig, device: torch.device):
        self.config = config
        self.tensor_device = device if config.update_group_backend == "nccl" else torch.device("cpu")
        self.group: Optional[UpdateGroup] = None

    def prepare(self, client: SGLangClient) -> None:
        """Open the broadcast group once, outside any weight-update session."""
        if self.group is None:
            self._open(client)

    def _open(self, client: SGLangClient) -> None:
        address = self.config.update_group_address or self.config.host
        listener = listening_socket(address)
        world_size = 1 + self.config.tensor_parallel  # trainer rank 0, server ranks 1..tp
        payload = init_group_payload(address, listener.getsockname()[1], 1, world_size,
                                     self.config.update_group_backend)
        with ThreadPoolExecutor(max_workers=1) as pool:
            # the server's join blocks until we join too, so its request runs beside our rendezvous
            answered = pool.submit(client.init_weights_update_group, payload)
            self.group = open_update_group(
                listener, world_size, DEFAULT_WEIGHT_UPDATE_GROUP,
                self.config.update_group_backend, self.config.request_timeout_s,
            )
            answered.result()

    def push(self, client: SGLangClient, bucket: NamedTensors, weight_version: str) -> None:
        tensors = [(name, tensor.detach().to(self.tensor_device).contiguous()) for name, tensor in bucket]
        payload = distributed_update_payload(tensors, DEFAULT_WEIGHT_UPDATE_GROUP, weight_version)
        with ThreadPoolExecutor(max_workers=1) as pool:
            answered = pool.submit(client.update_weights_from_distributed, payload)
            for _, tensor in tensors:
                broadcast_tensor(self.group, tensor)
            answered.result()

    def close(self, client: Optional[SGLangClient]) -> None:
        """Forget the group (after a server restart, or at shutdown); the next push opens a new one."""
        if self.group is None:
            return
        if client is not None:
            try:
                client.destroy_weights_update_group(DEFAULT_WEIGHT_UPDATE_GROUP)
            except RolloutError:  # the server may be gone; the local group is closed regardless
                pass
        close_update_group(self.group)
        self.group = None

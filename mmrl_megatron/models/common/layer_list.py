"""A ModuleList of megatron layers that checkpoints them as sharded tensors.

megatron-core's default sharded_state_dict treats a plain nn.ModuleList's tensors as replicated over
tensor-parallel ranks, so a save would keep TP rank 0's shards for every rank (and a load would hand
them to all). Delegating to each layer's own sharded_state_dict keeps their TP splits.
"""
import torch


class ShardedLayerList(torch.nn.ModuleList):
    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None) -> dict:
        from megatron.core.transformer.utils import sharded_state_dict_default

        state = {}
        for index, layer in enumerate(self):
            state.update(sharded_state_dict_default(layer, f"{prefix}{index}.", sharded_offsets, metadata))
        return state

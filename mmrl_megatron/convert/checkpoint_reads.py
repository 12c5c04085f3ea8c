"""Read pieces of tensors from a megatron-core (torch_dist) distributed checkpoint into given tensors.

A streamed export (checkpoint_io.convert_mcore_to_hf) loads one chunk of the model at a time: some
layers of a layer-stacked tensor, some experts. megatron-core's loader cannot take such a chunk on a
single rank: it describes the absent pieces as held by "another rank" and picks this one when there is
no other. So the pieces are read with torch.distributed.checkpoint directly, each rank on its own:
for every piece (checkpoint key, offset, destination tensor) the planner asks for the overlap of the
stored chunks with the piece's region, which the reader copies into the destination in place. Rows a
piece has beyond the stored tensor (a vocabulary padded for more tensor-parallel ranks than wrote it)
are left as they are.
"""
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import load as dcp_load
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex
from torch.distributed.checkpoint.planner import LoadPlan
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from .checkpoint_parts import piece_extent
from .errors import CheckpointError, one_line


@dataclass
class Piece:
    key: str  # the tensor's name in the checkpoint
    offset: Tuple[int, ...]  # where the piece starts in the checkpoint tensor, every axis
    destination: torch.Tensor  # filled in place; its shape is the piece's extent


class _PieceLoadPlanner(DefaultLoadPlanner):
    def __init__(self, pieces: Sequence[Piece]):
        super().__init__()
        self.pieces: Dict[Tuple[str, Tuple[int, ...]], torch.Tensor] = {}
        for piece in pieces:
            self.pieces[(piece.key, tuple(piece.offset))] = piece.destination

    def create_local_plan(self) -> LoadPlan:
        by_key: Dict[str, List[ChunkStorageMetadata]] = {}
        for (key, offset), destination in self.pieces.items():
            stored = self.metadata.state_dict_metadata.get(key)
            if stored is None:
                raise CheckpointError(f"the checkpoint has no tensor {key}")
            by_key.setdefault(key, []).append(ChunkStorageMetadata(torch.Size(offset), destination.shape))
        requests = []
        for key, chunks in by_key.items():
            requests += create_read_items_for_chunk_list(key, self.metadata.state_dict_metadata[key], chunks)
        return LoadPlan(requests)

    def lookup_tensor(self, index: MetadataIndex) -> torch.Tensor:
        return self.pieces[(index.fqn, tuple(index.offset))]


def read_pieces(checkpoint_dir: str, pieces: Sequence[Piece]) -> None:
    """Fill every piece's destination from checkpoint_dir (this rank alone, no collective)."""
    if not pieces:
        return
    try:
        dcp_load({}, storage_reader=FileSystemReader(checkpoint_dir), planner=_PieceLoadPlanner(pieces), no_dist=True)
    except CheckpointError:
        raise
    except (Exception, CheckpointException) as error:  # CheckpointException is a BaseException
        raise CheckpointError(f"reading {checkpoint_dir} failed: {one_line(error)}") from error


def model_pieces(sharded_state_dict) -> List[Piece]:
    """The pieces a model's sharded_state_dict asks for: each ShardedTensor's region of its checkpoint tensor,
    read straight into the parameter (the gate and up halves of a SwiGLU weight into its two views)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    apply_factories(sharded_state_dict)
    pieces = []
    for entry in nested_values(sharded_state_dict):
        if not isinstance(entry, ShardedTensor):
            continue
        # detached: the reader narrows and copies into the destination in place, which autograd forbids on a
        # view of a parameter taken in no_grad mode (the SwiGLU halves), as a checkpoint of another TP asks for
        pieces.append(Piece(entry.key, tuple(entry.global_offset), piece_extent(entry).detach()))
    return pieces

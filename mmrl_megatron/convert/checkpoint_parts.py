"""One megatron-core distributed checkpoint written as parts and joined, so no rank holds the whole model.

dist_checkpointing.save takes a whole sharded_state_dict at once. A streamed conversion (streaming.py) has
one chunk of the model at a time, so each chunk is saved as a checkpoint of its own under OUT/.parts/K.
A chunk holds pieces of tensors (some layers of a layer-stacked tensor, some experts), which megatron's
saver rejects (its integrity check, and on one rank its placement of absent pieces), so each piece is
saved as a whole tensor of its own, named `KEY@OFFSETS@GLOBAL_SHAPE`. `join_parts` moves every part's data
files into OUT and writes the one torch.distributed.checkpoint `.metadata` that puts each piece back at its
offset in KEY: the directory a single save of the whole model writes, which dist_checkpointing.load reads
under any layout. It checks that every tensor's pieces cover it exactly once, and writes megatron's
metadata.json (the mark of a complete checkpoint) last, so a conversion that stops early leaves nothing
that loads.

torch.distributed.checkpoint has no API for joining; this relies on its Metadata dataclass (state_dict_metadata,
planner_data, storage_data) and on its writer pickling it into `.metadata`, as torch 2.13 does.
"""
import dataclasses
import math
import os
import pickle
import shutil
from typing import Tuple

import torch

from .errors import CheckpointError

PARTS_DIR = ".parts"
_MEGATRON_METADATA = "metadata.json"
_DCP_METADATA = ".metadata"


def part_dir(out_dir: str, index: int) -> str:
    return os.path.join(out_dir, PARTS_DIR, str(index))


def _piece_key(key: str, offset, global_shape) -> str:
    return f"{key}@{','.join(map(str, offset))}@{','.join(map(str, global_shape))}"


def _parse_piece_key(name: str) -> Tuple[str, Tuple[int, ...], Tuple[int, ...]]:
    key, offset, global_shape = name.rsplit("@", 2)
    return key, tuple(int(n) for n in offset.split(",") if n), tuple(int(n) for n in global_shape.split(",") if n)


def piece_extent(entry) -> torch.Tensor:
    """A ShardedTensor's data viewed with its prepended (layer, expert) axes as size-1 dimensions: the
    region it covers in its checkpoint tensor, starting at entry.global_offset on every axis."""
    data = entry.data
    for _ in range(entry.prepend_axis_num):
        data = data.unsqueeze(0)
    return data


def as_whole_pieces(sharded_state_dict):
    """The chunk's ShardedTensors, each replaced by a whole tensor named by its key, offset and global shape
    (keeping its replica id, so replicated copies are still written once); other entries unchanged."""
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    apply_factories(sharded_state_dict)

    def whole(entry):
        if not isinstance(entry, ShardedTensor):
            return entry
        if entry.flattened_range is not None:
            raise CheckpointError(f"tensor {entry.key} is a flattened (distributed-optimizer) shard; the "
                                  "converters write model weights only")
        return ShardedTensor.from_rank_offsets(_piece_key(entry.key, entry.global_offset, entry.global_shape),
                                               piece_extent(entry), replica_id=entry.replica_id)

    return dict_list_map_inplace(whole, sharded_state_dict)


def save_part(sharded_state_dict, out_dir: str, index: int) -> None:
    """Save one chunk's sharded_state_dict as part `index` of out_dir (collective over every rank)."""
    from megatron.core import dist_checkpointing

    path = part_dir(out_dir, index)
    os.makedirs(path, exist_ok=True)
    dist_checkpointing.save(as_whole_pieces(sharded_state_dict), path)


def _read_metadata(path: str):
    with open(os.path.join(path, _DCP_METADATA), "rb") as handle:
        return pickle.load(handle)


def _volume(sizes) -> int:
    return math.prod(sizes)


def _overlap(first, second) -> bool:
    return all(a_offset < b_offset + b_size and b_offset < a_offset + a_size
               for a_offset, a_size, b_offset, b_size in zip(first.offsets, first.sizes, second.offsets, second.sizes))


def check_coverage(state_dict_metadata) -> None:
    """Raise CheckpointError naming the first tensor whose stored pieces leave a gap or overlap."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    for key, entry in state_dict_metadata.items():
        if not isinstance(entry, TensorStorageMetadata):
            continue
        stored = sum(_volume(chunk.sizes) for chunk in entry.chunks)
        overlapping = any(_overlap(a, b) for i, a in enumerate(entry.chunks) for b in entry.chunks[i + 1:])
        if stored != _volume(entry.size) or overlapping:
            raise CheckpointError(f"tensor {key}: the converted pieces hold {stored} of its {_volume(entry.size)} "
                                  f"elements{' and overlap' if overlapping else ''}; the model's chunks do not "
                                  "describe the whole tensor (a bug in the conversion, nothing was published)")


def _merge_into(joined, part, prefix: str) -> None:
    """Add one part's pieces to `joined` (a Metadata) at their offsets, its data files renamed with `prefix`."""
    from torch.distributed.checkpoint.metadata import (BytesStorageMetadata, ChunkStorageMetadata, MetadataIndex,
                                                       TensorStorageMetadata)

    placed = {}  # piece name -> (key, index of its chunk in the joined tensor, offset)
    for name, entry in part.state_dict_metadata.items():
        if isinstance(entry, BytesStorageMetadata):
            if name in joined.state_dict_metadata:
                raise CheckpointError(f"object {name} was written by two parts of the conversion")
            joined.state_dict_metadata[name] = entry
            continue
        key, offset, global_shape = _parse_piece_key(name)
        tensor = joined.state_dict_metadata.setdefault(
            key, TensorStorageMetadata(entry.properties, torch.Size(global_shape), []))
        if tuple(tensor.size) != global_shape or tensor.properties.dtype != entry.properties.dtype:
            raise CheckpointError(f"tensor {key} is {tuple(tensor.size)} {tensor.properties.dtype} in one part of the "
                                  f"conversion and {global_shape} {entry.properties.dtype} in another")
        placed[name] = (key, len(tensor.chunks), torch.Size(offset))
        tensor.chunks.append(ChunkStorageMetadata(offsets=torch.Size(offset), sizes=entry.size))
        joined.planner_data[key] = (key,)
    for index, info in part.storage_data.items():
        if index.fqn in placed:
            key, chunk, offset = placed[index.fqn]
            index = MetadataIndex(key, offset, chunk)
        joined.storage_data[index] = dataclasses.replace(info, relative_path=prefix + info.relative_path)
    joined.planner_data.update({name: path for name, path in (part.planner_data or {}).items() if name not in placed})


def join_parts(out_dir: str, count: int) -> None:
    """Turn out_dir/.parts/0..count-1 into one checkpoint in out_dir (call on one rank, after every save)."""
    parts = [part_dir(out_dir, index) for index in range(count)]
    joined = _read_metadata(parts[0])
    joined.storage_data = {}
    joined.state_dict_metadata = {}
    joined.planner_data = {}
    for index, path in enumerate(parts):
        prefix = f"part{index}"
        _merge_into(joined, _read_metadata(path), prefix)
        for name in os.listdir(path):
            if name.endswith(".distcp"):
                os.replace(os.path.join(path, name), os.path.join(out_dir, prefix + name))
    check_coverage(joined.state_dict_metadata)
    # common.pt holds the non-tensor state: the first part saves it, as it saves the model's objects
    for name in os.listdir(parts[0]):
        if name not in (_DCP_METADATA, _MEGATRON_METADATA) and not name.endswith(".distcp"):
            os.replace(os.path.join(parts[0], name), os.path.join(out_dir, name))
    with open(os.path.join(out_dir, _DCP_METADATA), "wb") as handle:
        pickle.dump(joined, handle)
    os.replace(os.path.join(parts[0], _MEGATRON_METADATA), os.path.join(out_dir, _MEGATRON_METADATA))
    shutil.rmtree(os.path.join(out_dir, PARTS_DIR))


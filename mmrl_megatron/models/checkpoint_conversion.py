"""Whole-directory conversions, the bodies of tools/checkpoint_convert/: HF -> megatron checkpoint and back.

Memory: the converters never hold the whole model. They build it on the meta device and convert one
chunk of at most `max_chunk_bytes` of this rank's tensors at a time (convert/streaming.py): HF tensors are read
one by one, each chunk is saved as a part of the distributed checkpoint and the parts are joined
(convert/checkpoint_parts.py); the way back reads one chunk's pieces from the checkpoint (convert/checkpoint_reads.py),
exports them, and writes HF shards of at most `max_shard_bytes`. Peak memory is a few chunks (the chunk,
the checkpoint writer's copy, resident pages of the memory-mapped input), measured in benchmarks/RESULTS.md.
"""
import os
from typing import List, Optional

import torch
import torch.distributed as dist

from ..convert.checkpoint_io import (DEFAULT_MAX_SHARD_BYTES, HF_FILES_SUBDIR, check_checkpoint_matches,
                                     check_tensor_parallel_entries, copy_hf_side_files, hf_files_dir,
                                     in_published_dtype, is_mcore_checkpoint, is_writer_rank, local_sharded_tensors,
                                     write_hf_safetensors)
from ..convert.checkpoint_manifest import damaged_file, write_manifest
from ..convert.checkpoint_parts import join_parts, save_part
from ..convert.checkpoint_reads import model_pieces, read_pieces
from ..convert.errors import CheckpointError
from ..convert.exporter import iter_hf_tensors
from ..convert.loader import load_hf_into_model
from ..convert.streaming import agreed_chunk_count, allocated, is_placeholder, tensor_chunks
from .building import build_meta_model, conversion_table
from .hf_config import read_hf_config


def _chunk_entries(sharded_state_dict, with_objects: bool):
    """The entries of a streamed model's sharded_state_dict whose tensors are in the current chunk; the
    model's non-tensor objects too when `with_objects` (they go with the first chunk)."""
    from megatron.core.dist_checkpointing.dict_utils import extract_matching_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    def in_chunk(value) -> bool:
        if isinstance(value, (ShardedTensor, ShardedTensorFactory)):
            return not is_placeholder(value.data)
        return with_objects

    return extract_matching_values(sharded_state_dict, in_chunk)[0]


def _prepare_output_dir(out_dir: str) -> None:
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise CheckpointError(f"{out_dir} is not empty: choose a new output directory (nothing was overwritten)")
    os.makedirs(out_dir, exist_ok=True)
    if dist.is_initialized():
        dist.barrier()  # no rank may see another's first file and mistake it for old contents


def _streamed_chunks(model, max_chunk_bytes: int):
    """(index, this rank's chunk) for as many chunks as the rank with the most has (others get empty ones)."""
    chunks = tensor_chunks(model, max_chunk_bytes)
    for index in range(agreed_chunk_count(chunks)):
        yield index, chunks[index] if index < len(chunks) else []


def convert_hf_to_mcore(hf_dir: str, out_dir: str, dims, device: Optional[torch.device] = None,
                        max_chunk_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> None:
    """HF safetensors -> a megatron distributed checkpoint plus hf_dir's non-weight files in out_dir/hf
    (collective over every rank of the started parallel.ParallelDims `dims`), holding at most one chunk of
    max_chunk_bytes of the model at a time."""
    _prepare_output_dir(out_dir)
    model = build_meta_model(hf_dir, dims)
    count = 0
    for index, chunk in _streamed_chunks(model, max_chunk_bytes):
        with allocated(chunk, device or torch.device("cpu")):
            load_hf_into_model(model, hf_dir, conversion_table(model), dims)
            sharded = _chunk_entries(model.sharded_state_dict(), with_objects=index == 0)
            check_tensor_parallel_entries(sharded, dims)
            save_part(sharded, out_dir, index)
        count = index + 1
    if dist.is_initialized():
        dist.barrier()
    if is_writer_rank():
        copy_hf_side_files(hf_files_dir(hf_dir), os.path.join(out_dir, HF_FILES_SUBDIR))
        join_parts(out_dir, count)
        write_manifest(out_dir)
    if dist.is_initialized():
        dist.barrier()


def model_key_prefix(mcore_dir: str, sharded_state_dict, role: str = "actor") -> str:
    """What the checkpoint puts before the model's tensor names: "" for a checkpoint of the model alone
    (hf_to_mcore.py); for a training run's checkpoint, where trainer/checkpoint.py saves each role's wrapped
    chunks under the role's name next to the optimizer state, the role's prefix (such as "actor.module.")."""
    from megatron.core.dist_checkpointing import load_tensors_metadata


    stored = load_tensors_metadata(mcore_dir)
    local = sorted(local_sharded_tensors(sharded_state_dict))
    if not local:
        return ""
    candidates = sorted(key[:-len(local[0])] for key in stored if key.endswith(local[0]))
    if "" in candidates:
        return ""
    for candidate in candidates:
        if candidate.startswith(f"{role}."):
            return candidate
    raise CheckpointError(f"{mcore_dir} has no tensor {local[0]}, bare or under the {role} role's name: it was "
                          "written for a different model (compare its hf/config.json with the model's)")


def check_no_unknown_tensors(sharded_state_dict, mcore_dir: str, prefix: str = "") -> None:
    """Raise CheckpointError naming a tensor of the checkpoint's model (its names under `prefix`) that no
    rank's model has (collective)."""
    from megatron.core.dist_checkpointing import load_tensors_metadata
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    wanted = [{item.key for item in nested_values(sharded_state_dict)
               if isinstance(item, (ShardedTensor, ShardedTensorFactory))}]
    if dist.is_initialized() and dist.get_world_size() > 1:
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, wanted[0])
        wanted = everyone
    stored = {key for key in load_tensors_metadata(mcore_dir) if key.startswith(prefix)}
    unknown = sorted(stored - set().union(*wanted))
    if unknown:
        raise CheckpointError(f"{mcore_dir} stores tensor {unknown[0]} ({len(unknown)} unknown in all) that the model "
                              "built from its hf/config.json has no place for: the config and the weights disagree")


def convert_mcore_to_hf(mcore_dir: str, out_dir: str, dims, device: Optional[torch.device] = None,
                        max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                        max_chunk_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> List[str]:
    """A megatron checkpoint (hf_to_mcore.py's, or a training run's: its actor) -> HF safetensors with the
    original names and dtype (config.json's), vocabulary padding removed, and the config/tokenizer/processor
    files; rank 0 writes, every rank of the started parallel.ParallelDims `dims` joins the gather. One chunk of
    max_chunk_bytes of the model is loaded at a time. Returns the names written."""
    if not is_mcore_checkpoint(mcore_dir):
        raise CheckpointError(f"{mcore_dir} is not a megatron distributed checkpoint (no metadata.json)")
    problem = damaged_file(mcore_dir)
    if problem is not None:
        raise CheckpointError(problem)
    model = build_meta_model(mcore_dir, dims)
    prefix = model_key_prefix(mcore_dir, model.sharded_state_dict())
    whole = model.sharded_state_dict(prefix=prefix)
    check_tensor_parallel_entries(whole, dims)
    check_checkpoint_matches(whole, mcore_dir)
    check_no_unknown_tensors(whole, mcore_dir, prefix)

    def named_tensors():
        for index, chunk in _streamed_chunks(model, max_chunk_bytes):
            with allocated(chunk, device or torch.device("cpu")):
                sharded = _chunk_entries(model.sharded_state_dict(prefix=prefix), with_objects=False)
                read_pieces(mcore_dir, model_pieces(sharded))
                yield from iter_hf_tensors([model], dims)

    if is_writer_rank():
        names = write_hf_safetensors(in_published_dtype(named_tensors(), read_hf_config(mcore_dir)), out_dir,
                                     max_shard_bytes)
        copy_hf_side_files(hf_files_dir(mcore_dir), out_dir)
    else:
        names = [name for name, _ in named_tensors()]  # the gather is collective: other ranks take part and discard
    if dist.is_initialized():
        dist.barrier()
    return names

"""Checkpoints on disk in both layouts: megatron-core distributed checkpoints and HF safetensors directories.

A megatron checkpoint written here is a `megatron.core.dist_checkpointing` directory of the model's
sharded_state_dict (global tensors, so it loads under any TP/PP) plus `hf/`, a copy of the source HF
directory's non-weight files (config.json, tokenizer, chat template, preprocessor), so the checkpoint
alone is enough to build the model, score with it, or export it back to HF. Its manifest.json
(checkpoint_manifest.py) lets every load name a truncated, missing or corrupted file before reading.

The whole-directory conversions built on these are in conversions.py.
"""
import json
import math
import os
import shutil
from typing import Dict, Iterable, Iterator, List, Tuple

import torch
import torch.distributed as dist

from .checkpoint_manifest import damaged_file
from .errors import CheckpointError, one_line
from .model_params import is_routed_expert

HF_FILES_SUBDIR = "hf"  # a megatron checkpoint keeps the HF side files (config.json, tokenizer) here
DEFAULT_MAX_SHARD_BYTES = 5 * 1024 ** 3  # transformers' save_pretrained default
_WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json", ".pt", ".pth")


# -- the HF side --------------------------------------------------------------------------------

def copy_hf_side_files(source_dir: str, out_dir: str) -> List[str]:
    """Copy every non-weight file (config, tokenizer, chat template, processor configs) from source_dir."""
    os.makedirs(out_dir, exist_ok=True)
    copied = []
    for name in sorted(os.listdir(source_dir)):
        path = os.path.join(source_dir, name)
        if os.path.isfile(path) and not name.endswith(_WEIGHT_SUFFIXES):
            shutil.copy2(path, os.path.join(out_dir, name))
            copied.append(name)
    if "config.json" not in copied:
        raise CheckpointError(f"{source_dir} has no config.json: pass a Hugging Face model directory")
    return copied


def hf_files_dir(model_dir: str) -> str:
    """Where config.json and the tokenizer live for either kind of model directory."""
    return os.path.join(model_dir, HF_FILES_SUBDIR) if is_mcore_checkpoint(model_dir) else model_dir


def is_mcore_checkpoint(model_dir: str) -> bool:
    from megatron.core.dist_checkpointing import check_is_distributed_checkpoint

    return check_is_distributed_checkpoint(model_dir)


def _shard_file_name(index: int) -> str:
    # The final count is unknown while streaming; shards are renamed to transformers' pattern at the end.
    return f"model-{index + 1:05d}.safetensors.partial"


def write_hf_safetensors(named_tensors: Iterable[Tuple[str, torch.Tensor]], out_dir: str,
                         max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> List[str]:
    """Write (name, tensor) pairs as transformers-style safetensors shards, holding one shard at a time.

    One shard becomes `model.safetensors`; several become `model-0000i-of-0000n.safetensors` plus
    `model.safetensors.index.json`. Returns the tensor names in written order."""
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    shards: List[List[str]] = []
    pending: Dict[str, torch.Tensor] = {}
    pending_bytes = 0

    def flush():
        save_file(pending, os.path.join(out_dir, _shard_file_name(len(shards))), metadata={"format": "pt"})
        shards.append(list(pending))

    for name, tensor in named_tensors:
        size = tensor.numel() * tensor.element_size()
        if pending and pending_bytes + size > max_shard_bytes:
            flush()
            pending, pending_bytes = {}, 0
        if name in pending or any(name in shard for shard in shards):
            raise CheckpointError(f"tensor {name} was produced twice while writing {out_dir}; the rule table maps "
                                  "two megatron parameters to one HF name")
        # safetensors needs contiguous CPU tensors it owns (a gathered buffer may be reused by the producer).
        pending[name] = tensor.detach().to("cpu", copy=True).contiguous()
        pending_bytes += size
    if pending or not shards:
        flush()
    return _finalise_shards(out_dir, shards)


def _finalise_shards(out_dir: str, shards: List[List[str]]) -> List[str]:
    if len(shards) == 1:
        os.replace(os.path.join(out_dir, _shard_file_name(0)), os.path.join(out_dir, "model.safetensors"))
        return shards[0]
    weight_map, total = {}, 0
    for index, names in enumerate(shards):
        final = f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors"
        os.replace(os.path.join(out_dir, _shard_file_name(index)), os.path.join(out_dir, final))
        weight_map.update({name: final for name in names})
        total += os.path.getsize(os.path.join(out_dir, final))
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as handle:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, handle, indent=2)
    return [name for names in shards for name in names]


def is_writer_rank() -> bool:
    """The rank that writes files every rank agreed on (rank 0, or the only process)."""
    return not dist.is_initialized() or dist.get_rank() == 0


# -- the megatron side --------------------------------------------------------------------------

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def checkpoint_dtype(hf_config: Dict) -> str:
    """The dtype name the HF checkpoint stores ("float32" or "bfloat16"); conversion keeps it, so it is exact."""
    text = hf_config.get("text_config") or {}
    name = hf_config.get("dtype") or hf_config.get("torch_dtype") or text.get("dtype") or text.get("torch_dtype")
    name = str(name or "bfloat16").replace("torch.", "")
    if name not in _DTYPES:
        raise CheckpointError(f"config.json says dtype {name!r}; the converters keep the stored precision and "
                              f"support {sorted(_DTYPES)} only")
    return name


def in_published_dtype(named_tensors: Iterable[Tuple[str, torch.Tensor]],
                       hf_config: Dict) -> Iterator[Tuple[str, torch.Tensor]]:
    """The exported tensors in the dtype config.json declares. The models keep some tensors in fp32 whatever
    their dtype (megatron's RMSNorm weights, the router's expert bias), where the published checkpoints store
    everything in that dtype; exports match them, so an export loads and compares like the original."""
    dtype = _DTYPES[checkpoint_dtype(hf_config)]
    for name, tensor in named_tensors:
        yield name, tensor.to(dtype)


def local_sharded_tensors(sharded_state_dict) -> Dict[str, object]:
    """This rank's ShardedTensor entries by checkpoint key (factories not yet applied are left out)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    return {item.key: item for item in nested_values(sharded_state_dict) if isinstance(item, ShardedTensor)}


def check_tensor_parallel_entries(sharded_state_dict, dims) -> None:
    """Raise CheckpointError naming a tensor-parallel parameter whose checkpoint entry is not TP-sharded
    (`dims`: the parallel.ParallelDims the model was built under).

    Such an entry claims every TP rank holds the same tensor: a save keeps TP rank 0's shard for all of
    them and a load hands it to every rank, silently. It happens when a module holds megatron layers in
    a plain container (nn.ModuleList) without a sharded_state_dict that delegates to them."""
    for key, entry in local_sharded_tensors(sharded_state_dict).items():
        data = entry.data
        if not getattr(data, "tensor_model_parallel", False):
            continue
        tensor_parallel = dims.expert_tensor if is_routed_expert(key) else dims.tensor
        if tensor_parallel == 1:
            continue
        # counted in elements, not along partition_dim: grouped expert weights report a partition_dim that
        # is not the axis they are split on
        if math.prod(entry.global_shape[entry.prepend_axis_num:]) == data.numel():
            raise CheckpointError(f"tensor {key} is split over {tensor_parallel} tensor-parallel ranks but its "
                                  f"sharded_state_dict entry describes it as replicated (global shape "
                                  f"{tuple(entry.global_shape)}); the module holding it needs a sharded_state_dict "
                                  "that delegates to its megatron layers")


def check_checkpoint_matches(sharded_state_dict, mcore_dir: str) -> None:
    """Raise CheckpointError naming the first tensor this rank needs that the checkpoint lacks or shapes differently."""
    from megatron.core.dist_checkpointing import load_tensors_metadata

    stored = load_tensors_metadata(mcore_dir)
    for key, wanted in local_sharded_tensors(sharded_state_dict).items():
        if key not in stored:
            raise CheckpointError(f"{mcore_dir} has no tensor {key}: it was written for a different model "
                                  "configuration (compare its hf/config.json with the model's)")
        stored_shape, wanted_shape = tuple(stored[key].global_shape), tuple(wanted.global_shape)
        if wanted.allow_shape_mismatch:
            # vocabulary-padded tensors: megatron pads the vocabulary to a multiple of TP, so the row
            # count depends on the layout that wrote them; the real rows load and the padding is zero.
            stored_shape, wanted_shape = stored_shape[1:], wanted_shape[1:]
        if stored_shape != wanted_shape:
            raise CheckpointError(f"tensor {key} in {mcore_dir} has global shape {tuple(stored[key].global_shape)}, "
                                  f"the model expects {tuple(wanted.global_shape)}")


def load_mcore_checkpoint(model, mcore_dir: str, dims) -> None:
    """Fill `model` (built under the parallel.ParallelDims `dims`) from a distributed checkpoint written under
    any TP/PP (collective)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling
    from torch.distributed.checkpoint.api import CheckpointException

    problem = damaged_file(mcore_dir)
    if problem is not None:
        raise CheckpointError(problem)
    sharded = model.sharded_state_dict()
    check_tensor_parallel_entries(sharded, dims)
    check_checkpoint_matches(sharded, mcore_dir)
    try:
        # RAISE_ALL also stops on tensors stored in the checkpoint that no rank's model has.
        state = dist_checkpointing.load(sharded, mcore_dir, strict=StrictHandling.RAISE_ALL)
    # megatron raises several types, torch a CheckpointException (a BaseException): all mean it does not fit
    except (Exception, CheckpointException) as error:
        raise CheckpointError(f"loading {mcore_dir} failed: {one_line(error)}") from error
    model.load_state_dict(state)

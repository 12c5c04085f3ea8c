"""Checkpoints with megatron-core's distributed checkpointing, crash-safe, resumable at another TP/PP.

Layout under <run_dir>/checkpoints: step_<N>/ (written as step_<N>.tmp/ and renamed when every rank has
finished) and `latest`, a one-line file naming the newest complete step, replaced atomically last. So a
crash mid-save leaves `latest` pointing at the previous, complete checkpoint.

A checkpoint holds the trainable roles' model and optimizer shards (resharded on load when TP/PP change),
the common state (step, LR schedules, counters), each data-parallel rank's data position, and each
rank's RNG states (restored only when the layout is unchanged; otherwise reseeded from the step), and
hf/, the starting model's config, tokenizer and processor files, so that
tools/checkpoint_convert/mcore_to_hf.py exports the actor from the checkpoint alone.
"""
import os
import shutil
from typing import Dict, Optional

import torch
import torch.distributed as dist

LATEST = "latest"
# megatron-core 0.16's DistributedOptimizer defaults to fully_sharded_model_space, whose flattened
# ShardedTensors its own dist_checkpointing then rejects ("flattened_range is not supported", seen on an
# H200); fully_reshardable stores each parameter's state whole, so a checkpoint resumes at any TP/PP/DP.
OPTIMIZER_FORMAT = {"distrib_optim_sharding_type": "fully_reshardable"}


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or does not match this run; the message names the path."""


def _rng_state() -> Dict:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    state = {"torch": torch.get_rng_state(), "tracker": get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: Dict) -> None:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    torch.set_rng_state(state["torch"])
    get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _layout_signature() -> str:
    from megatron.core import parallel_state as ps

    return (f"world={dist.get_world_size()},tp={ps.get_tensor_model_parallel_world_size()},"
            f"pp={ps.get_pipeline_model_parallel_world_size()}")


def latest_checkpoint(root: str) -> Optional[str]:
    pointer = os.path.join(root, LATEST)
    if not os.path.exists(pointer):
        return None
    with open(pointer) as handle:
        path = os.path.join(root, handle.read().strip())
    if not os.path.isdir(path):
        raise CheckpointError(f"{pointer} names {path}, which does not exist; delete {pointer} to start fresh "
                              "or restore the directory")
    return path


class Checkpointer:
    """Saves and loads the trainable roles (name -> ModelRole) plus loop state."""

    def __init__(self, root: str, roles: Dict[str, object], hf_dir: Optional[str] = None):
        """`hf_dir`: the model directory the run started from; its config, tokenizer and processor files are
        kept in every checkpoint's hf/, so tools/checkpoint_convert/mcore_to_hf.py exports a checkpoint alone."""
        self.root = root
        self.roles = roles
        self.hf_dir = hf_dir

    def _sharded_state(self, is_loading: bool) -> Dict:
        """Each role's model chunks and optimizer; keys carry the role name so roles never collide."""
        state = {}
        for name, role in self.roles.items():
            merged = {}
            for index, chunk in enumerate(role.chunks):
                state[f"{name}.model{index}"] = chunk.sharded_state_dict(prefix=f"{name}.")
                merged.update(state[f"{name}.model{index}"])
            state[f"{name}.optimizer"] = role.optimizer.sharded_state_dict(merged, is_loading=is_loading,
                                                                           metadata=OPTIMIZER_FORMAT)
        return state

    def save(self, step: int, common: Dict, data_state: Optional[Dict]) -> str:
        """Collective: every rank calls it. Returns the final directory."""
        from megatron.core import dist_checkpointing, parallel_state

        final = os.path.join(self.root, f"step_{step:08d}")
        temporary = final + ".tmp"
        if dist.get_rank() == 0:
            shutil.rmtree(temporary, ignore_errors=True)
            os.makedirs(temporary)
            if self.hf_dir is not None:
                from ..convert.checkpoint_io import HF_FILES_SUBDIR, copy_hf_side_files, hf_files_dir

                copy_hf_side_files(hf_files_dir(self.hf_dir), os.path.join(temporary, HF_FILES_SUBDIR))
        dist.barrier()
        state = self._sharded_state(is_loading=False)
        state["common"] = dict(common, step=step, schedulers={n: r.scheduler.state_dict() for n, r in self.roles.items()},
                               layout=_layout_signature())
        dist_checkpointing.save(state, temporary)
        torch.save(_rng_state(), os.path.join(temporary, f"rng_rank{dist.get_rank():05d}.pt"))
        if data_state is not None and parallel_state.get_model_parallel_group().rank() == 0:
            torch.save(data_state, os.path.join(temporary, f"data_dp{parallel_state.get_data_parallel_rank():05d}.pt"))
        dist.barrier()
        if dist.get_rank() == 0:
            shutil.rmtree(final, ignore_errors=True)
            os.rename(temporary, final)
            pointer = os.path.join(self.root, LATEST)
            with open(pointer + ".tmp", "w") as handle:
                handle.write(os.path.basename(final))
            os.replace(pointer + ".tmp", pointer)
        dist.barrier()
        return final

    def load(self, path: str):
        """Restore the roles in place; returns (common state, this data-parallel rank's data state or None)."""
        from megatron.core import dist_checkpointing, parallel_state

        if not os.path.exists(os.path.join(path, "metadata.json")):
            raise CheckpointError(f"{path} is not a complete distributed checkpoint (no metadata.json)")
        sharded = self._sharded_state(is_loading=True)
        loaded = dist_checkpointing.load(sharded, path)
        for name, role in self.roles.items():
            for index, chunk in enumerate(role.chunks):
                chunk.load_state_dict(loaded[f"{name}.model{index}"], strict=False)
            role.optimizer.load_state_dict(loaded[f"{name}.optimizer"])
            role.scheduler.load_state_dict(loaded["common"]["schedulers"][name])
        common = loaded["common"]
        rng_path = os.path.join(path, f"rng_rank{dist.get_rank():05d}.pt")
        if common.get("layout") == _layout_signature() and os.path.exists(rng_path):
            _set_rng_state(torch.load(rng_path, weights_only=False))
        data_path = os.path.join(path, f"data_dp{parallel_state.get_data_parallel_rank():05d}.pt")
        data_state = torch.load(data_path, weights_only=False) if os.path.exists(data_path) else None
        return common, data_state


def export_hf(model_chunks, hf_source_dir: str, out_dir: str) -> Optional[str]:
    """Write the actor as a Hugging Face directory (weights via convert.iter_hf_tensors in the source
    config's dtype, in transformers' shard layout, the other files copied from the source checkpoint). Collective; rank 0 writes. Returns
    out_dir on rank 0."""
    from ..convert import iter_hf_tensors
    from ..convert.checkpoint_io import (copy_hf_side_files, hf_files_dir, in_published_dtype, read_hf_config,
                                         write_hf_safetensors)

    named = iter_hf_tensors(model_chunks)
    if dist.get_rank() != 0:
        for _ in named:  # the gather is collective: every rank walks it
            pass
        return None
    write_hf_safetensors(in_published_dtype(named, read_hf_config(hf_source_dir)), out_dir)
    copy_hf_side_files(hf_files_dir(hf_source_dir), out_dir)
    return out_dir

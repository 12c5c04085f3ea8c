"""Checkpoints with megatron-core's distributed checkpointing, crash-safe, resumable at another TP/PP.

Layout under <run_dir>/checkpoints: step_<N>/ (written as step_<N>.tmp/ and renamed when every rank has
finished) and `latest`, a one-line file naming the newest complete step, replaced atomically last. So a
crash mid-save leaves `latest` pointing at the previous, complete checkpoint.

The Checkpointer holds the run's Stateful parts (state_dict / load_state_dict) and saves and restores them
together: the trainable roles' model and optimizer shards (resharded on load when TP/PP change) and LR
schedules, the TrainerState (step and counters, in the common state under its field names, as checkpoints
held them before it was a class), each data-parallel rank's data position (the dataset's state), and each
rank's RNG states (restored only when the layout is unchanged; otherwise reseeded from the step), and
hf/, the starting model's config, tokenizer and processor files, so that
tools/checkpoint_convert/mcore_to_hf.py exports the actor from the checkpoint alone. Last, manifest.json
records every file's size (and the checksum of the small ones), so a file truncated, deleted or
overwritten later is named before anything is read; `resume` then falls back to the previous checkpoint.
With keep_last = k > 0 only the k newest checkpoints stay (the older ones are removed after each save), so
k >= 2 keeps a fallback for a newest one found damaged.
The RNG and data states hold tensors and plain values only, and load with torch.load(weights_only=True).
"""
import logging
import os
import re
import shutil
from typing import Dict, List, Optional

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from ..convert.checkpoint_manifest import damaged_file, write_manifest
from ..convert.errors import CheckpointError, one_line

logger = logging.getLogger(__name__)
LATEST = "latest"
_STEP_DIR = re.compile(r"step_(\d+)$")
# megatron-core 0.16's DistributedOptimizer defaults to fully_sharded_model_space, whose flattened
# ShardedTensors its own dist_checkpointing then rejects ("flattened_range is not supported", seen on an
# H200); fully_reshardable stores each parameter's state whole, so a checkpoint resumes at any TP/PP/DP.
OPTIMIZER_FORMAT = {"distrib_optim_sharding_type": "fully_reshardable"}


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


def _layout_signature(dims) -> str:
    return f"world={dims.world_size},tp={dims.tensor},pp={dims.pipeline}"


def _pointer_target(root: str) -> Optional[str]:
    """The directory `latest` names, or None when there is no `latest`."""
    pointer = os.path.join(root, LATEST)
    if not os.path.exists(pointer):
        return None
    with open(pointer) as handle:
        return os.path.join(root, handle.read().strip())


def _step_number(path: str) -> int:
    found = _STEP_DIR.search(os.path.basename(path))
    return int(found.group(1)) if found else -1


def resume_candidates(root: str) -> List[str]:
    """The checkpoint `latest` names, then the older complete step_<N> directories, newest first ([] without
    `latest`): the order in which `Checkpointer.resume` tries them."""
    target = _pointer_target(root)
    if target is None:
        return []
    older = [os.path.join(root, name) for name in os.listdir(root)
             if _STEP_DIR.fullmatch(name) and os.path.isdir(os.path.join(root, name))]
    older = [path for path in older if _step_number(path) < _step_number(target)]
    return [target] + sorted(older, key=_step_number, reverse=True)


def _read_state_file(path: str):
    """(the object in a small state file, None) or (None, what is wrong with it); tensors and plain values only."""
    if not os.path.exists(path):
        return None, f"{path} is missing"
    try:
        return torch.load(path, weights_only=True), None
    except Exception as error:  # unpickling raises many types; each means this file cannot be used
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        # torch's refusal of a non-tensor object opens with a paragraph of advice; the reason follows it
        refused = len(lines) > 1 and lines[0].startswith("Weights only load failed")
        reason = lines[1] if refused else (lines[0] if lines else "")
        return None, (f"{path} cannot be read with torch.load(weights_only=True) "
                      f"({type(error).__name__}: {reason[:200]})")


def _agree(problem: Optional[str]) -> Optional[str]:
    """The first rank's problem, on every rank (collective), so all ranks take the same branch."""
    problems = [None] * dist.get_world_size()
    dist.all_gather_object(problems, problem)
    return next((found for found in problems if found is not None), None)


def stale_checkpoints(root: str, newest_step: int, keep_last: int) -> List[str]:
    """The complete step_<N> directories up to newest_step beyond the keep_last newest ([] for keep_last 0)."""
    if keep_last <= 0:
        return []
    complete = [os.path.join(root, name) for name in os.listdir(root)
                if _STEP_DIR.fullmatch(name) and os.path.isdir(os.path.join(root, name))]
    older_first = sorted((path for path in complete if _step_number(path) <= newest_step), key=_step_number)
    return older_first[:-keep_last]


class Checkpointer:
    """Saves and loads the run's Stateful parts: the trainable roles (name -> ModelRole: model chunks, optimizer,
    scheduler), the TrainerState and the dataset (state_dict / load_state_dict; None: no data position)."""

    def __init__(self, root: str, roles: Dict[str, object], trainer_state, dims, dataset=None,
                 hf_dir: Optional[str] = None, keep_last: int = 0):
        """`dims`: the run's parallel.ParallelDims (started). `hf_dir`: the model directory the run started from;
        its config, tokenizer and processor files are kept in every checkpoint's hf/, so
        tools/checkpoint_convert/mcore_to_hf.py exports a checkpoint alone. `keep_last`: checkpoints kept, the
        newest (0: all)."""
        self.root = root
        self.dims = dims
        self.roles = roles
        self.trainer_state = trainer_state
        self.dataset = dataset
        self.hf_dir = hf_dir
        self.keep_last = keep_last

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

    def save(self) -> str:
        """Every part at the trainer state's step; collective: every rank calls it. Returns the final directory."""
        from megatron.core import dist_checkpointing

        step = self.trainer_state.step
        # every model-parallel rank of a data-parallel rank reads the same rows: the first one's position is kept
        writes_data = self.dataset is not None and self.dims.model_parallel_group.rank() == 0
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
        # rank 0's common state is the one stored; data_parallel says which data_dp files it comes with
        data_parallel = self.dims.data if self.dataset is not None else 0
        state["common"] = dict(self.trainer_state.state_dict(),
                               schedulers={n: r.scheduler.state_dict() for n, r in self.roles.items()},
                               layout=_layout_signature(self.dims), data_parallel=data_parallel)
        dist_checkpointing.save(state, temporary)
        torch.save(_rng_state(), os.path.join(temporary, f"rng_rank{dist.get_rank():05d}.pt"))
        if writes_data:
            torch.save(self.dataset.state_dict(),
                       os.path.join(temporary, f"data_dp{self.dims.data_parallel_rank:05d}.pt"))
        dist.barrier()
        if dist.get_rank() == 0:
            write_manifest(temporary)
            shutil.rmtree(final, ignore_errors=True)
            os.rename(temporary, final)
            pointer = os.path.join(self.root, LATEST)
            with open(pointer + ".tmp", "w") as handle:
                handle.write(os.path.basename(final))
            os.replace(pointer + ".tmp", pointer)
            for stale in stale_checkpoints(self.root, step, self.keep_last):  # only once `latest` moved past them
                shutil.rmtree(stale)
        dist.barrier()
        return final

    def load(self, path: str) -> None:
        """Restore every part in place from the checkpoint at `path`.

        Collective. A damaged or incomplete checkpoint raises CheckpointError naming the bad file, the same
        message on every rank; the roles may then hold some of its tensors, which a later load replaces, while
        the trainer state and the dataset are untouched."""
        from megatron.core import dist_checkpointing

        problem = _agree(damaged_file(path) if dist.get_rank() == 0 else None)
        if problem is not None:
            raise CheckpointError(problem)
        sharded = self._sharded_state(is_loading=True)
        try:
            loaded = dist_checkpointing.load(sharded, path)
        except (Exception, CheckpointException) as error:  # CheckpointException is a BaseException
            loaded, problem = None, f"{path} could not be loaded: {one_line(error)}"
        problem = _agree(problem)
        if problem is not None:
            raise CheckpointError(problem)
        common = loaded["common"]
        rng, problem = None, None
        if common.get("layout") == _layout_signature(self.dims):
            rng, problem = _read_state_file(os.path.join(path, f"rng_rank{dist.get_rank():05d}.pt"))
        data_state, data_rank = None, self.dims.data_parallel_rank
        data_path = os.path.join(path, f"data_dp{data_rank:05d}.pt")
        saved_ranks = common.get("data_parallel")
        # checkpoints from before data_parallel was recorded: the file is read when it is there
        saved_here = (data_rank < saved_ranks) if saved_ranks is not None else os.path.exists(data_path)
        if self.dataset is not None and saved_here:
            data_state, data_problem = _read_state_file(data_path)
            problem = problem or data_problem
        problem = _agree(problem)
        if problem is not None:
            raise CheckpointError(problem)
        for name, role in self.roles.items():
            for index, chunk in enumerate(role.chunks):
                chunk.load_state_dict(loaded[f"{name}.model{index}"], strict=False)
            role.optimizer.load_state_dict(loaded[f"{name}.optimizer"])
            role.scheduler.load_state_dict(common["schedulers"][name])
        if rng is not None:
            _set_rng_state(rng)
        self.trainer_state.load_state_dict(common)
        if data_state is not None:
            self.dataset.load_state_dict(data_state)

    def resume(self, resume: str = "auto") -> Optional[str]:
        """Load what trainer.resume asks for into the parts: returns the checkpoint's path, or None to start fresh.

        "never": None. A directory: that checkpoint, or CheckpointError. "auto": the newest usable checkpoint
        (resume_candidates): a damaged one is skipped with a warning naming the bad file; CheckpointError,
        naming each, when `latest` exists and none is usable; None when there is no `latest`. Collective."""
        if resume == "never":
            return None
        if resume != "auto":
            self.load(resume)
            return resume
        failures = []
        for path in resume_candidates(self.root):
            try:
                if not os.path.isdir(path):
                    raise CheckpointError(f"{path}, which {os.path.join(self.root, LATEST)} names, does not exist")
                self.load(path)
                return path
            except CheckpointError as error:
                failures.append(str(error))
                if dist.get_rank() == 0:
                    logger.warning("checkpoint %s is unusable: %s; trying the previous one", path, error)
        if failures:
            raise CheckpointError(f"no usable checkpoint in {self.root}: {'; '.join(failures)}; restore the named "
                                  "files, or resume from scratch with trainer.resume=never")
        return None


def export_hf(model_chunks, dims, hf_source_dir: str, out_dir: str) -> Optional[str]:
    """Write the actor (built under the parallel.ParallelDims `dims`) as a Hugging Face directory (weights via
    convert.iter_hf_tensors in the source config's dtype, in transformers' shard layout, the other files copied
    from the source checkpoint). Collective; rank 0 writes. Returns out_dir on rank 0."""
    from ..convert import iter_hf_tensors
    from ..convert.checkpoint_io import copy_hf_side_files, hf_files_dir, in_published_dtype, write_hf_safetensors
    from ..models.hf_config import read_hf_config

    named = iter_hf_tensors(model_chunks, dims)
    if dist.get_rank() != 0:
        for _ in named:  # the gather is collective: every rank walks it
            pass
        return None
    write_hf_safetensors(in_published_dtype(named, read_hf_config(hf_source_dir)), out_dir)
    copy_hf_side_files(hf_files_dir(hf_source_dir), out_dir)
    return out_dir

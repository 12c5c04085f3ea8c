"""Freeing a trainable role's training memory while the rollout engine generates, and refilling it after.

When (RolloutOffload, called by trainer/loop.py): optimizer states and gradients leave right after the
update, before the weight sync brings the engine's memory back (SGLang's resume restores its whole pool);
weights leave after the sync, which reads them; everything returns after generation, before the log-prob
passes and the update. A checkpoint save or export in between gets it back for its duration (onloaded()).

What leaves the device follows the role's optimizer switches (parallel/memory_plan.rollout_offload, which
the memory planner reads too, so the plan counts what happens here):
- optimizer states (`offload_during_rollout`): the fp32 main parameters and Adam's exp_avg / exp_avg_sq
  (and step) of megatron-core's distributed or plain optimizer, copied to pinned host memory and back;
- gradient buffers (`offload_grads_during_rollout`): megatron DDP's contiguous grad buffers, released and
  re-allocated as zeros, not copied: the trainer zeroes them before every backward (ModelRole.train_step),
  so their values between steps are never read;
- weights (`offload_params_during_rollout`): the model's parameters (megatron DDP's param buffer under
  the distributed optimizer), copied to pinned host memory and back; the engine generates with its own copy.

The unit moved is a tensor storage, not a tensor: megatron keeps views into one storage (params and
main_grad into the DDP buffers, shard views for the distributed optimizer, `param.main_param` handles), and
emptying the storage in place (`untyped_storage().resize_(0)`) frees the memory under every view at once while
every Python reference stays valid; refilling writes the same bytes back, so a step after a round trip is
bit-identical. megatron-core's own MegatronOptimizer.offload_to_cpu replaces tensors with unpinned copies
(slower transfers, and views such as main_grad keep the device memory alive), hence this module.
Device-agnostic: on CPU runs the storages are emptied into (unpinned) CPU copies, so the logic is tested there.
"""
import contextlib
import itertools
import time
from typing import Dict, Iterable, List, Optional

import torch

from ..parallel.memory_plan import rollout_offload
from .optim import optimizer_parts

MAX_BLOCK_BYTES = 1 << 30


def _distinct_storages(tensors: Iterable[torch.Tensor], device: torch.device, exclude=()) -> List:
    """Storages of `tensors` on `device`, once each, in first-seen order, leaving out empty ones and the
    data pointers in `exclude`."""
    seen, storages = set(exclude), []
    for tensor in tensors:
        storage = tensor.untyped_storage()
        if not _on(storage.device, device) or storage.nbytes() == 0 or storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        storages.append(storage)
    return storages


def _on(place: torch.device, device: torch.device) -> bool:
    """Whether `place` is `device` ("cuda" without an index means any GPU of this process)."""
    return place.type == device.type and (device.index is None or place.index in (None, device.index))


def _bytes_view(storage) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)


class HostArena:
    """Host memory for byte strings of given sizes, laid end to end over equal power-of-two blocks (pinned
    when CUDA is present). torch's pinned allocator rounds every allocation up to a power of two, so one
    buffer per tensor (or one for all) could pin up to twice the offloaded bytes; equal blocks of at most
    MAX_BLOCK_BYTES waste less than one block."""

    def __init__(self, sizes: List[int]):
        self.sizes = list(sizes)
        total = sum(self.sizes)
        self.block_bytes = min(MAX_BLOCK_BYTES, 1 << max(total - 1, 0).bit_length())
        pin = torch.cuda.is_available()
        self.blocks = [torch.empty(self.block_bytes, dtype=torch.uint8, pin_memory=pin)
                       for _ in range(-(-total // self.block_bytes))]
        self.offsets = list(itertools.accumulate(self.sizes, initial=0))[:-1]

    def pieces(self, index: int):
        """(host view, start, end) covering byte string `index`: its bytes [start, end) live in the view."""
        position, done, nbytes = self.offsets[index], 0, self.sizes[index]
        while done < nbytes:
            block, within = divmod(position + done, self.block_bytes)
            length = min(self.block_bytes - within, nbytes - done)
            yield self.blocks[block][within:within + length], done, done + length
            done += length


class OffloadedStorages:
    """Storages emptied on their device and refilled in place: with keep_values their bytes go to a host
    arena (kept between rounds while the sizes stay the same, since pinning is slow) and come back;
    without, they come back zeroed."""

    def __init__(self, keep_values: bool = True):
        self.keep_values = keep_values
        self._storages: List = []
        self._sizes: List[int] = []
        self._arena: Optional[HostArena] = None

    @property
    def offloaded(self) -> bool:
        return bool(self._storages)

    @property
    def bytes(self) -> int:
        """Bytes of the storages last offloaded."""
        return sum(self._sizes)

    def offload(self, storages: List) -> int:
        """Empty `storages` (after copying their bytes out when keep_values); returns the bytes freed."""
        if self.offloaded:
            raise RuntimeError("storages are already offloaded: call onload() first")
        fixed = [storage for storage in storages if not storage.resizable()]
        if fixed:  # checked before anything moves, so a refusal leaves every storage as it was
            raise RuntimeError(f"{len(fixed)} of {len(storages)} storages to offload cannot be resized (the first "
                               f"holds {fixed[0].nbytes()} bytes): a numpy view or an external buffer shares "
                               "their memory; clone tensors before calling .numpy() on them")
        self._sizes = [storage.nbytes() for storage in storages]
        if self.keep_values:
            if self._arena is None or self._arena.sizes != self._sizes:
                self._arena = HostArena(self._sizes)
            for index, storage in enumerate(storages):
                view = _bytes_view(storage)
                for host, start, end in self._arena.pieces(index):
                    host.copy_(view[start:end], non_blocking=True)
            _synchronize(storages)  # the copies read the storages about to be freed
        for storage in storages:
            storage.resize_(0)
        self._storages = storages
        return self.bytes

    def onload(self) -> int:
        """Re-allocate every emptied storage at its size and write its bytes (or zeros) back; returns bytes."""
        for index, (storage, nbytes) in enumerate(zip(self._storages, self._sizes)):
            storage.resize_(nbytes)
            view = _bytes_view(storage)
            if not self.keep_values:
                view.zero_()
                continue
            for host, start, end in self._arena.pieces(index):
                view[start:end].copy_(host, non_blocking=True)
        _synchronize(self._storages)
        self._storages = []
        return self.bytes


def _synchronize(storages) -> None:
    if any(storage.device.type == "cuda" for storage in storages):
        torch.cuda.synchronize()


def model_parameters(chunks) -> List[torch.nn.Parameter]:
    return [parameter for chunk in chunks for parameter in chunk.parameters()]


def gradient_buffers(chunks) -> List[torch.Tensor]:
    """megatron DDP's contiguous grad buffers (dense and expert-parallel) of every chunk."""
    return [buffer.grad_data for chunk in chunks
            for buffer in list(getattr(chunk, "buffers", [])) + list(getattr(chunk, "expert_parallel_buffers", []))]


def optimizer_state_tensors(optimizer) -> List[torch.Tensor]:
    """The tensors the inner torch optimizers own: parameter-group tensors (fp32 main parameters for a bf16
    model; for an fp32 model the model's own parameters, which optimizer_state_storages leaves out) and
    every tensor of their per-parameter state (Adam: exp_avg, exp_avg_sq, step)."""
    tensors = []
    for part in optimizer_parts(optimizer):
        inner = getattr(part, "optimizer", None)
        if inner is None:  # a stub optimizer for a rank without parameters of this kind
            continue
        tensors.extend(p for group in inner.param_groups for p in group["params"])
        tensors.extend(value for state in inner.state.values() for value in state.values()
                       if isinstance(value, torch.Tensor))
    return tensors


def optimizer_state_storages(optimizer, chunks, device: torch.device) -> List:
    """Storages only the optimizer uses: its state minus anything shared with model weights or gradients."""
    shared = {s.data_ptr() for s in _distinct_storages(model_parameters(chunks) + gradient_buffers(chunks), device)}
    return _distinct_storages(optimizer_state_tensors(optimizer), device, exclude=shared)


def weight_storages(chunks, device: torch.device) -> List:
    return _distinct_storages(model_parameters(chunks), device)


def gradient_storages(chunks, device: torch.device) -> List:
    return _distinct_storages(gradient_buffers(chunks), device)


def offload_optimizer_states(optimizer, chunks, device: torch.device,
                             into: Optional[OffloadedStorages] = None) -> OffloadedStorages:
    """Move the optimizer's own states to host memory; onload_storages(returned) brings them back."""
    into = into or OffloadedStorages(keep_values=True)
    into.offload(optimizer_state_storages(optimizer, chunks, device))
    return into


def offload_gradients(chunks, device: torch.device, into: Optional[OffloadedStorages] = None) -> OffloadedStorages:
    """Release the DDP grad buffers (they come back zeroed)."""
    into = into or OffloadedStorages(keep_values=False)
    into.offload(gradient_storages(chunks, device))
    return into


def offload_weights(chunks, device: torch.device, into: Optional[OffloadedStorages] = None) -> OffloadedStorages:
    """Move the model's parameters to host memory."""
    into = into or OffloadedStorages(keep_values=True)
    into.offload(weight_storages(chunks, device))
    return into


def onload_storages(offloaded: OffloadedStorages) -> int:
    return offloaded.onload()


class RoleOffload:
    """One trainable role's offload during rollout, as its optimizer config's switches say."""

    def __init__(self, role, optim_config):
        self.role = role
        self.switches = rollout_offload(optim_config)
        self._parts = {"optimizer states": OffloadedStorages(keep_values=True),
                       "gradients": OffloadedStorages(keep_values=False),
                       "weights": OffloadedStorages(keep_values=True)}

    def offload(self, kinds) -> int:
        """Free those of `kinds` the switches name and are not already off the device; returns bytes freed."""
        role, freed = self.role, 0
        wanted = {"optimizer states": self.switches.optimizer_states, "gradients": self.switches.gradients,
                  "weights": self.switches.weights}
        for kind in kinds:
            part = self._parts[kind]
            if not wanted[kind] or part.offloaded:
                continue
            if kind != "optimizer states" and role.graphs is not None:
                role.graphs.clear()  # the storages come back at new addresses, which no captured graph knows
            if kind == "optimizer states":
                offload_optimizer_states(role.optimizer, role.chunks, role.device, into=part)
            elif kind == "gradients":
                offload_gradients(role.chunks, role.device, into=part)
            else:
                offload_weights(role.chunks, role.device, into=part)
            freed += part.bytes
        return freed

    def onload(self) -> List[str]:
        """Bring back everything offloaded; returns the kinds that were off the device."""
        kinds = [kind for kind, part in self._parts.items() if part.offloaded]
        for kind in kinds:
            onload_storages(self._parts[kind])
        return kinds


class RolloutOffload:
    """The trainer's hooks, in the order of a step: after the update, before the engine's memory comes back
    (before_engine_resumes: optimizer states, gradients); after the weight sync, which reads the weights
    (after_weight_sync: weights); after generation, before scoring and the next update (after_rollout:
    everything back). onloaded() brings everything back for a block (a checkpoint save, an export) and
    frees it again. The hooks return {metric: value} to log."""

    def __init__(self, roles: List[RoleOffload]):
        self.roles = [role for role in roles if role.switches.any]

    def before_engine_resumes(self) -> Dict[str, float]:
        return self._offload(["optimizer states", "gradients"], "offload")

    def after_weight_sync(self) -> Dict[str, float]:
        return self._offload(["weights"], "offload_weights")

    def after_rollout(self) -> Dict[str, float]:
        if not self.roles:
            return {}
        start = time.perf_counter()
        for role in self.roles:
            role.onload()
        return {"time/onload_s": time.perf_counter() - start}

    @contextlib.contextmanager
    def onloaded(self):
        kinds = [role.onload() for role in self.roles]
        try:
            yield
        finally:
            for role, offloaded in zip(self.roles, kinds):
                role.offload(offloaded)

    def _offload(self, kinds: List[str], name: str) -> Dict[str, float]:
        start = time.perf_counter()
        freed = sum(role.offload(kinds) for role in self.roles)
        if not freed:
            return {}
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # hand the freed blocks back to the driver: SGLang runs in another process
        return {f"time/{name}_s": time.perf_counter() - start, f"{name}/gigabytes": freed / 1024 ** 3}


def rollout_offload_for(parts) -> RolloutOffload:
    """The hooks for a run's trainable roles (actor with actor.optim, critic with critic.optim)."""
    config = parts.config
    roles = [RoleOffload(parts.actor, config.actor.optim)]
    if parts.critic is not None:
        roles.append(RoleOffload(parts.critic, config.critic.optim))
    return RolloutOffload(roles)

"""A model whose tensors exist one bounded chunk at a time, for conversions that never hold the whole model.

The model is built on the meta device (structure and names, no memory: checkpoint_io.build_meta_model).
`tensor_chunks` groups this rank's parameters and buffers, in module order, into chunks of at most
`max_bytes` (a larger tensor forms its own chunk); `allocated(chunk)` gives the chunk's tensors real, uninitialised memory for the duration of
a `with` block and hands it back afterwards. Loaders and exporters skip tensors still on the meta device,
so running them inside the block touches exactly the chunk.
"""
import contextlib
from dataclasses import dataclass, field
from typing import Iterator, List, Tuple

import torch
import torch.distributed as dist

from .model_params import as_chunks


def _like(tensor: torch.Tensor, device) -> torch.Tensor:
    """An uninitialised tensor of tensor's shape and dtype on `device`; a Parameter for a Parameter."""
    data = torch.empty(tensor.shape, dtype=tensor.dtype, device=device)
    if not isinstance(tensor, torch.nn.Parameter):
        return data
    copy = torch.nn.Parameter(data, requires_grad=tensor.requires_grad)
    # megatron-core keeps the tensor-parallel layout (tensor_model_parallel, partition_dim, allreduce...)
    # as attributes on the parameter object: the copy carries the same ones
    copy.__dict__.update(tensor.__dict__)
    return copy


@dataclass
class TensorSlot:
    """One parameter or buffer: its meta placeholder and every (module, attribute) it is registered under
    (a tied weight is registered twice)."""
    placeholder: torch.Tensor
    registrations: List[Tuple[torch.nn.Module, str]] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return self.placeholder.numel() * self.placeholder.element_size()

    def _register(self, tensor: torch.Tensor) -> None:
        for module, name in self.registrations:
            table = module._parameters if name in module._parameters else module._buffers
            table[name] = tensor

    def allocate(self, device: torch.device) -> None:
        self._register(_like(self.placeholder, device))

    def release(self) -> None:
        self._register(self.placeholder)


def tensor_slots(model) -> List[TensorSlot]:
    """Every parameter and buffer of this rank's model, once each, in module order, all placeholders after
    the call: the few tensors built off the meta device (megatron-core places some buffers, such as the
    router's expert bias, on the current device explicitly) are replaced by meta ones, as every tensor is
    loaded anyway and conversions run no forward pass."""
    slots = {}
    for chunk in as_chunks(model):
        for module in chunk.modules():
            for table in (module._parameters, module._buffers):
                for name, tensor in table.items():
                    if tensor is not None:
                        placeholder = tensor if is_placeholder(tensor) else _like(tensor, "meta")
                        slots.setdefault(id(tensor), TensorSlot(placeholder)).registrations.append((module, name))
    for slot in slots.values():
        slot.release()
    return list(slots.values())


def tensor_chunks(model, max_bytes: int) -> List[List[TensorSlot]]:
    """tensor_slots grouped into consecutive chunks of at most max_bytes (a larger tensor alone)."""
    chunks: List[List[TensorSlot]] = []
    size = 0
    for slot in tensor_slots(model):
        if not chunks or size + slot.nbytes > max_bytes:
            chunks.append([])
            size = 0
        chunks[-1].append(slot)
        size += slot.nbytes
    return chunks


def agreed_chunk_count(chunks: List[List[TensorSlot]]) -> int:
    """The most chunks any rank has: every rank takes part in that many collective saves or loads."""
    count = torch.tensor([len(chunks)], dtype=torch.long)
    if dist.is_initialized() and dist.get_world_size() > 1:
        backend_device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        count = count.to(backend_device)
        dist.all_reduce(count, op=dist.ReduceOp.MAX)
    return int(count.item())


@contextlib.contextmanager
def allocated(chunk: List[TensorSlot], device: torch.device) -> Iterator[None]:
    """The chunk's tensors in real (uninitialised) memory inside the block, back on meta after it."""
    for slot in chunk:
        slot.allocate(device)
    try:
        yield
    finally:
        for slot in chunk:
            slot.release()


def is_placeholder(tensor: torch.Tensor) -> bool:
    """True for a tensor of a streamed model outside its chunk: loaders and exporters leave it alone."""
    return tensor.device.type == "meta"

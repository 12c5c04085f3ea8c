"""Pack variable-length sequences into one stream without padding.

The boundaries travel twice: as the int32 device tensor `cu_seqlens` the variable-length attention kernel
reads, and as host ints (`PackedSegments.bounds`) for everything that needs a Python number (the kernel's
maximum length, the CPU path's slices, offsets). Reading them back from the device would stall the GPU
stream in every layer, so nothing inside a forward or backward does.
"""
import dataclasses
import functools
from typing import List, Optional, Sequence, Tuple

import torch
from megatron.core.packed_seq_params import PackedSeqParams

from .transfer import to_device


@dataclasses.dataclass
class PackedSegments(PackedSeqParams):
    """megatron-core's PackedSeqParams plus the host-side boundaries [0, end_1, ..., T]."""

    bounds: Tuple[int, ...] = ()

    @functools.cached_property
    def common_length(self) -> Optional[int]:
        """The length every non-empty sequence has, or None if they differ (computed once, read per layer)."""
        bounds = self.bounds
        lengths = {end - start for start, end in zip(bounds[:-1], bounds[1:]) if end > start}
        return lengths.pop() if len(lengths) == 1 else None

    def to(self, device) -> "PackedSegments":
        cu_seqlens = to_device(self.cu_seqlens_q, device)
        return dataclasses.replace(self, cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens)

    def as_one_stream(self) -> "PackedSegments":
        """The same packing presented to megatron-core as one [T, 1] sequence ("sbhd").

        For models whose rotary angles are computed per packed token (M-RoPE position ids, the vision
        tower's patch positions), megatron's THD rotary path only re-slices the angles it was given, and
        it reads cu_seqlens on the host to do so, twice per layer. As one stream the angles apply as they
        are; the core attention still keeps every sequence to itself through these boundaries."""
        return dataclasses.replace(self, qkv_format="sbhd")


def packed_segments(bounds: Sequence[int], device=None, qkv_format: str = "thd") -> PackedSegments:
    """PackedSegments for sequences delimited by `bounds` (host ints, starting at 0)."""
    bounds = tuple(int(b) for b in bounds)
    longest = max((end - start for start, end in zip(bounds[:-1], bounds[1:])), default=0)
    cu_seqlens = torch.tensor(bounds, dtype=torch.int32)
    cu_seqlens = cu_seqlens if device is None else to_device(cu_seqlens, device)
    return PackedSegments(qkv_format=qkv_format, cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
                          max_seqlen_q=longest, max_seqlen_kv=longest, bounds=bounds)


def as_packed_segments(params: PackedSeqParams) -> PackedSegments:
    """`params` with host-side boundaries; megatron's own PackedSeqParams (built by a caller outside the
    trainer, such as a test) pay one host read of cu_seqlens here, once per forward."""
    if isinstance(params, PackedSegments):
        return params
    return packed_segments(params.cu_seqlens_q.tolist(), params.cu_seqlens_q.device, params.qkv_format)


def pack_sequences(sequences: Sequence[Sequence[int]]) -> Tuple[torch.Tensor, torch.Tensor, PackedSegments]:
    """(input_ids [1, T] long, cu_seqlens [n + 1] int32, PackedSegments) for token-id lists; T = total length."""
    if not sequences or any(len(sequence) == 0 for sequence in sequences):
        raise ValueError("pack_sequences needs at least one sequence and no empty ones")
    ids: List[int] = [token for sequence in sequences for token in sequence]
    bounds = [0]
    for sequence in sequences:
        bounds.append(bounds[-1] + len(sequence))
    params = packed_segments(bounds)
    return torch.tensor(ids, dtype=torch.long).unsqueeze(0), params.cu_seqlens_q, params


def append_padding_sequence(input_ids: torch.Tensor, params: Optional[PackedSegments],
                            prompt_mask: Optional[torch.Tensor], length: int, pad_id: int = 0):
    """Grow a packed stream [1, T] to `length` tokens with one extra sequence of pad_id tokens that
    attends only to itself (outside every prompt), so the real sequences compute exactly what they did.
    Returns (input_ids, packed params, prompt_mask); unchanged when T == length. Unpacked input
    (params None) is one causal sequence, which the trailing pads cannot influence either."""
    extra = length - input_ids.shape[1]
    if extra <= 0:
        return input_ids, params, prompt_mask
    input_ids = torch.nn.functional.pad(input_ids, (0, extra), value=pad_id)
    if prompt_mask is not None:
        prompt_mask = torch.nn.functional.pad(prompt_mask, (0, extra), value=False)
    if params is not None:
        params = as_packed_segments(params)
        params = packed_segments(params.bounds + (length,), params.cu_seqlens_q.device, params.qkv_format)
    return input_ids, params, prompt_mask

"""Pack variable-length sequences into one stream without padding (megatron-core's THD format)."""
from typing import List, Optional, Sequence, Tuple

import torch
from megatron.core.packed_seq_params import PackedSeqParams


def packed_seq_params(cu_seqlens: torch.Tensor) -> PackedSeqParams:
    """THD parameters for sequences delimited by cu_seqlens (int32, [n + 1], starting at 0)."""
    longest = int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if cu_seqlens.numel() > 1 else 0
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
                           max_seqlen_q=longest, max_seqlen_kv=longest)


def pack_sequences(sequences: Sequence[Sequence[int]]) -> Tuple[torch.Tensor, torch.Tensor, PackedSeqParams]:
    """(input_ids [1, T] long, cu_seqlens [n + 1] int32, PackedSeqParams) for token-id lists; T = total length."""
    if not sequences or any(len(sequence) == 0 for sequence in sequences):
        raise ValueError("pack_sequences needs at least one sequence and no empty ones")
    ids: List[int] = [token for sequence in sequences for token in sequence]
    lengths = torch.tensor([len(sequence) for sequence in sequences], dtype=torch.int32)
    cu_seqlens = torch.nn.functional.pad(torch.cumsum(lengths, 0, dtype=torch.int32), (1, 0))
    return torch.tensor(ids, dtype=torch.long).unsqueeze(0), cu_seqlens, packed_seq_params(cu_seqlens)


def append_padding_sequence(input_ids: torch.Tensor, params: Optional[PackedSeqParams],
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
        bounds = params.cu_seqlens_q
        params = packed_seq_params(torch.cat([bounds, bounds.new_tensor([length])]))
    return input_ids, params, prompt_mask

"""Pack variable-length sequences into one stream without padding (megatron-core's THD format)."""
from typing import List, Sequence, Tuple

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

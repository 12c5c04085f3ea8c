"""pack_sequences concatenates token lists without padding and delimits them for THD attention."""
import pytest
import torch

from mmrl_megatron.models.common.packing import pack_sequences


def test_pack_sequences_concatenates_and_delimits():
    """Invariant: ids are the sequences back to back; cu_seqlens marks where each starts and ends."""
    ids, cu_seqlens, params = pack_sequences([[5, 6, 7], [8], [9, 10]])
    assert ids.tolist() == [[5, 6, 7, 8, 9, 10]] and ids.dtype == torch.long
    assert cu_seqlens.tolist() == [0, 3, 4, 6] and cu_seqlens.dtype == torch.int32
    assert params.qkv_format == "thd"
    assert torch.equal(params.cu_seqlens_q, cu_seqlens) and torch.equal(params.cu_seqlens_kv, cu_seqlens)
    assert params.max_seqlen_q == params.max_seqlen_kv == 3


@pytest.mark.parametrize("sequences", [[], [[1], []]])
def test_pack_sequences_rejects_empty_input(sequences):
    """Invariant: an empty batch or an empty sequence is an error, not a silent zero-length segment."""
    with pytest.raises(ValueError):
        pack_sequences(sequences)

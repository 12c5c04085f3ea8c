"""Core attention for megatron-core's local layer specs: packed (variable-length) and padded input.

megatron-core 0.16.1's local DotProductAttention materialises the score matrix (0.58x Hugging Face's
speed on an H100) and rejects packed sequences, so our specs put this module in its place.

Packed input costs a constant number of kernels per layer, whatever the number of sequences: on a GPU
in bf16/fp16, one call of torch's variable-length flash attention (`torch.nn.attention.varlen`; on an
H200 4.4x the per-sequence SDPA loop for 18 sequences, forward + backward), or, when every sequence has
the same length (fixed-length packing, equal images in a vision tower), one batched SDPA over
[sequences, heads, length, d], which torch dispatches to cuDNN's fused attention on Hopper: on an H200
1.4-1.6x the varlen kernel forward + backward for 2 x 2,048 tokens and 1.4x for 16 images of 1,024
patches (bench_attention.py, RESULTS.md 2026-12-02). torch 2.11's own cuDNN ragged path is no
alternative for training: its backward sizes a buffer by the head width instead of the longest sequence
(pytorch#186142, fixed after 2.11). Elsewhere (the CPU, fp32, attention dropout) each sequence is one
SDPA call: the exact reference path. Lengths come from the host-side boundaries
(packing.PackedSegments), never from the device.
"""
import functools
import inspect
import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule

from .packing import as_packed_segments

VARLEN_DTYPES = (torch.bfloat16, torch.float16)


@functools.lru_cache(maxsize=None)
def _varlen_attention():
    """(torch's varlen_attn, the names of its parameters), or None before torch 2.9. Its keywords moved
    between releases (is_causal became window_size, enable_gqa arrived later), hence the signature."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


def packed_kernel(query: torch.Tensor, dropout: float) -> str:
    """'varlen' (one kernel for all sequences) or 'segments' (one SDPA per sequence, exact)."""
    if query.is_cuda and query.dtype in VARLEN_DTYPES and dropout == 0.0 and _varlen_attention() is not None:
        return "varlen"
    return "segments"


def batched_attention(query, key, value, length: int, causal: bool, scale: float) -> torch.Tensor:
    """[t, heads, d] packed sequences that all have `length` tokens as one batched SDPA -> [t, heads, d_value]."""
    count = query.shape[0] // length

    def batch(tensor):  # [t, h, d] -> [count, h, length, d], a view
        return tensor.view(count, length, *tensor.shape[1:]).transpose(1, 2)

    out = F.scaled_dot_product_attention(batch(query), batch(key), batch(value), is_causal=causal, scale=scale,
                                         enable_gqa=key.shape[1] != query.shape[1])
    return out.transpose(1, 2).reshape(query.shape[0], query.shape[1], value.shape[-1])


# Below this length the batched SDPA was slower: on an H200, 256 windows of 64 patches (the vision tower's)
# took 0.20 ms forward against varlen's 0.14-0.17 (bench_attention.py, RESULTS.md 2026-12-02). torch's own
# cuDNN varlen selection draws the same line (it declines max_q <= 128).
BATCHED_MIN_LENGTH = 129


def packed_attention(query, key, value, params: PackedSeqParams, causal: bool, scale: float) -> torch.Tensor:
    """[t, heads, d] packed sequences through one GPU kernel call -> [t, heads, d_value]: the batched SDPA
    when they share one length of at least BATCHED_MIN_LENGTH, else the varlen kernel."""
    length = as_packed_segments(params).common_length
    if length is not None and length >= BATCHED_MIN_LENGTH:
        return batched_attention(query, key, value, length, causal, scale)
    return varlen_attention(query, key, value, params, causal, scale)


def sequence_attention(query, key, value, bounds, causal: bool, scale: float, dropout: float) -> torch.Tensor:
    """[t, heads, d] packed sequences between host-side `bounds`, one SDPA each (the exact path)
    -> [t, heads, d_value]."""
    outputs = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:
            continue
        piece = [x[start:end].transpose(0, 1).unsqueeze(0) for x in (query, key, value)]
        attended = F.scaled_dot_product_attention(*piece, dropout_p=dropout, is_causal=causal, scale=scale,
                                                  enable_gqa=key.shape[1] != query.shape[1])
        outputs.append(attended[0].transpose(0, 1))
    return torch.cat(outputs, dim=0)


def packed_core_attention(query, key, value, params: PackedSeqParams, causal: bool, scale: float,
                          dropout: float) -> torch.Tensor:
    """[t, heads, d] packed sequences -> [t, heads, d_value]: one GPU kernel call (packed_attention) where
    packed_kernel allows, else one SDPA per sequence."""
    if packed_kernel(query, dropout) == "varlen":
        return packed_attention(query, key, value, params, causal, scale)
    return sequence_attention(query, key, value, as_packed_segments(params).bounds, causal, scale, dropout)


def varlen_attention(query, key, value, params: PackedSeqParams, causal: bool, scale: float) -> torch.Tensor:
    """[t, heads, d] packed sequences through one varlen_attn call -> [t, heads, d_value].

    Keys/values with fewer heads are shared by query groups (repeated where the kernel lacks enable_gqa);
    a value width other than the query's (MLA) is zero-padded to it, as flash kernels need one width."""
    kernel, names = _varlen_attention()
    kwargs = {"scale": scale}
    if "window_size" in names:
        kwargs["window_size"] = (-1, 0) if causal else (-1, -1)
    else:
        kwargs["is_causal"] = causal
    if key.shape[1] != query.shape[1]:
        if "enable_gqa" in names:
            kwargs["enable_gqa"] = True
        else:
            groups = query.shape[1] // key.shape[1]
            key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    value_width = value.shape[-1]
    if value_width != query.shape[-1]:
        value = F.pad(value, (0, query.shape[-1] - value_width))
    out = kernel(query, key, value, params.cu_seqlens_q, params.cu_seqlens_kv, params.max_seqlen_q,
                 params.max_seqlen_kv, **kwargs)
    return out[..., :value_width]


class TorchCoreAttention(MegatronModule):
    """Same constructor and forward contract as megatron-core's DotProductAttention.

    forward(query [s, b, heads, d], or [t, heads, d] for THD-packed input, key/value with this rank's
    query groups) -> [s, b, heads * d] (or [t, heads * d]). Packed input is PackedSegments (packing.py),
    THD or presented as one sbhd stream [t, 1, heads, d]."""

    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType, attention_type: str,
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 cp_comm_type: Optional[str] = None, pg_collection=None) -> None:
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("TorchCoreAttention does not split sequences over context-parallel ranks; use the TE spec")
        self.attn_mask_type = attn_mask_type
        head_dim = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else (
            config.softmax_scale if config.softmax_scale is not None else 1.0 / math.sqrt(head_dim))
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout

    def _attend(self, query, key, value, causal: bool, mask=None):
        """query [b, heads, s, d], key/value [b, groups, s, d] -> [b, heads, s, d]."""
        return F.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0,
            is_causal=causal and mask is None, scale=self.softmax_scale, enable_gqa=key.shape[1] != query.shape[1])

    def forward(self, query, key, value, attention_mask, attn_mask_type: Optional[AttnMaskType] = None,
                attention_bias=None, packed_seq_params: Optional[PackedSeqParams] = None):
        if attention_bias is not None:
            raise ValueError("TorchCoreAttention takes no attention_bias")
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        causal = mask_type == AttnMaskType.causal
        if packed_seq_params is not None and packed_seq_params.cu_seqlens_q is not None:
            if query.dim() == 4:  # one sbhd stream [t, 1, heads, d]
                out = self._packed(query.squeeze(1), key.squeeze(1), value.squeeze(1), causal, packed_seq_params)
                return out.unsqueeze(1)
            return self._packed(query, key, value, causal, packed_seq_params)
        # [s, b, h, d] -> [b, h, s, d]; a given mask is megatron's (True = masked out) and replaces causality
        mask = None if attention_mask is None else ~attention_mask
        out = self._attend(query.permute(1, 2, 0, 3), key.permute(1, 2, 0, 3), value.permute(1, 2, 0, 3),
                           causal, mask)
        return out.permute(2, 0, 1, 3).reshape(query.shape[0], query.shape[1], -1)

    def _packed(self, query, key, value, causal: bool, params: PackedSeqParams):
        """[t, heads, d] packed sequences: attention never crosses a boundary -> [t, heads * d_value]."""
        out = packed_core_attention(query, key, value, params, causal, self.softmax_scale,
                                    self.dropout if self.training else 0.0)
        return out.reshape(out.shape[0], -1)

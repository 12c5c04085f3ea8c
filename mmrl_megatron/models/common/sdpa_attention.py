"""Core attention over torch's scaled_dot_product_attention, for packed (THD) and padded (SBHD) input.

megatron-core 0.16.1's local DotProductAttention materialises the score matrix (0.58x Hugging Face's
speed on an H100) and rejects packed sequences; this module is the drop-in `core_attention` of our
local layer specs. Packed input runs one SDPA call per sequence: exact, and on an H100 within 1.3x of a
flex_attention document mask without needing torch.compile (shared/reference/gpu_anchors.md).
"""
import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule


class SDPACoreAttention(MegatronModule):
    """Same constructor and forward contract as megatron-core's DotProductAttention.

    forward(query [s, b, heads, d] or [t, heads, d] when packed, key/value with this rank's query groups)
    -> [s, b, heads * d] (or [t, heads * d] when packed)."""

    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType, attention_type: str,
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 cp_comm_type: Optional[str] = None, pg_collection=None) -> None:
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("SDPACoreAttention does not split sequences over context-parallel ranks; use the TE spec")
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
            raise ValueError("SDPACoreAttention takes no attention_bias")
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        causal = mask_type == AttnMaskType.causal
        if packed_seq_params is not None and packed_seq_params.qkv_format == "thd":
            return self._packed(query, key, value, causal, packed_seq_params)
        # [s, b, h, d] -> [b, h, s, d]; a given mask is megatron's (True = masked out) and replaces causality
        mask = None if attention_mask is None else ~attention_mask
        out = self._attend(query.permute(1, 2, 0, 3), key.permute(1, 2, 0, 3), value.permute(1, 2, 0, 3),
                           causal, mask)
        return out.permute(2, 0, 1, 3).reshape(query.shape[0], query.shape[1], -1)

    def _packed(self, query, key, value, causal: bool, params: PackedSeqParams):
        """[t, heads, d] packed sequences delimited by cu_seqlens: attention never crosses a boundary."""
        bounds = params.cu_seqlens_q.tolist()
        outputs = []
        for start, end in zip(bounds[:-1], bounds[1:]):
            if end == start:
                continue
            piece = [x[start:end].transpose(0, 1).unsqueeze(0) for x in (query, key, value)]
            outputs.append(self._attend(*piece, causal=causal)[0].transpose(0, 1))
        out = torch.cat(outputs, dim=0)
        return out.reshape(out.shape[0], -1)

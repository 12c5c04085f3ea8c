"""The Qwen2.5-VL vision tower's blocks for the embedded engine: one attention kernel per layer, fused norms.

Without flash-attention, transformers runs the tower's attention as one SDPA call per window (a
448x448 image has 16 windows, so a batch of 256 images costs about 115,000 calls over the 28 window
layers), which makes the vision tower, not decoding, the cost of a multimodal rollout. On a GPU every
window and image is one sequence of a single attention call (core_attention.packed_attention,
the trainer's kernels); elsewhere windows of equal length stack into one batched SDPA call (the exact path).
The block's norms, its fp32 rotary embedding and its SwiGLU run fused as in the language model
(decode_layer.py) instead of as HF's chains of full passes over [patches, 1280] tensors. The MLP's gate and
up projections are one GEMM, and its hidden width is padded with zero weights from Qwen2.5-VL's 3,420 to a
multiple of 64: rows of 3,420 bf16 values are not 16-byte aligned, which sends cuBLAS to slow Ampere-era
kernels (on an H200, 256 images: 230 TFLOP/s, 0.94 s of a 1.49 s tower, RESULTS.md 2026-12-03 second session).
The math is HF's: same projections, rotary embedding, scale and per-window softmax (the padding adds zeros).
"""
import types
from collections import defaultdict
from typing import Sequence

import torch
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision

from ..common.core_attention import packed_attention, packed_kernel
from ..common.decode_layer import check_swiglu, rms_norm, swiglu
from ..common.fused_projections import MLP_PARTS, FusedWeightViews, InputPaddedLinear, concatenate_projections
from ..common.packing import PackedSegments, packed_segments

MLP_ALIGN = 64  # the MLP's hidden width is padded to a multiple of this (see above)


def host_segments(cu_seqlens: torch.Tensor) -> PackedSegments:
    """cu_seqlens as PackedSegments (host bounds and a device copy), made once per tensor: HF's tower hands
    all its blocks the same two boundary tensors in a forward (the windows' and the whole images'), so this
    reads each once instead of once per block (on a GPU each read waits for the queued work: 32 waits in
    every prefill of a 32-block tower)."""
    segments = getattr(cu_seqlens, "_host_segments", None)
    if segments is None:
        segments = packed_segments(cu_seqlens.tolist(), cu_seqlens.device)
        cu_seqlens._host_segments = segments  # lives and dies with this forward's tensor
    return segments


def length_grouped_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bounds: Sequence[int],
                             scale: float) -> torch.Tensor:
    """Attention within each chunk [bounds[i], bounds[i+1]) of [S, heads, D] tensors -> [S, heads, D]."""
    starts_by_length = defaultdict(list)
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end > start:
            starts_by_length[end - start].append(start)
    _, heads, head_dim = query.shape
    output = torch.empty_like(query)
    for length, starts in starts_by_length.items():
        index = (torch.tensor(starts, device=query.device)[:, None]
                 + torch.arange(length, device=query.device)[None, :]).flatten()

        def windows(tensor: torch.Tensor) -> torch.Tensor:
            return tensor[index].view(len(starts), length, heads, head_dim).transpose(1, 2)

        attended = torch.nn.functional.scaled_dot_product_attention(windows(query), windows(key), windows(value),
                                                                    scale=scale)
        output[index] = attended.transpose(1, 2).reshape(-1, heads, head_dim)
    return output


def _grouped_vision_attention_forward(self, hidden_states, cu_seqlens, position_embeddings=None, **kwargs):
    """Qwen2_5_VLVisionAttention.forward with length-grouped attention (signature of transformers 5)."""
    if position_embeddings is None:  # a caller of another transformers generation: keep HF's own path
        return self._per_window_forward(hidden_states, cu_seqlens, position_embeddings=position_embeddings, **kwargs)
    length = hidden_states.shape[0]
    query, key, value = self.qkv(hidden_states).reshape(length, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    if query.is_cuda:
        from ..common.layer_kernels import rotate_query_key  # Triton: present wherever CUDA tensors are

        query, key = rotate_query_key(query, key, *position_embeddings)
    else:
        query, key = apply_rotary_pos_emb_vision(query, key, *position_embeddings)
    segments = host_segments(cu_seqlens)
    if packed_kernel(query, dropout=0.0) == "varlen":
        attended = packed_attention(query, key, value, segments, causal=False, scale=self.scaling)
    else:
        attended = length_grouped_attention(query, key, value, segments.bounds, self.scaling)
    return self.proj(attended.reshape(length, -1))


def _fused_block_forward(self, hidden_states, cu_seqlens, position_embeddings=None, **kwargs):
    """Qwen2_5_VLVisionBlock.forward with the fused norms and SwiGLU."""
    hidden = hidden_states + self.attn(rms_norm(hidden_states, self.norm1), cu_seqlens=cu_seqlens,
                                       position_embeddings=position_embeddings, **kwargs)
    mlp = self.mlp
    normed = rms_norm(hidden, self.norm2)
    gate, up = mlp.gate_up_proj(normed)
    return hidden + mlp.down_proj(swiglu(gate, up))


def use_fast_vision_blocks(model: torch.nn.Module, blocks_path: str = "model.visual.blocks") -> FusedWeightViews:
    """Switch every vision block of this model instance (not the class) at `blocks_path` to the forward above,
    with its MLP's projections concatenated and padded; returns the lookup of their former names."""
    check_swiglu(model.config.vision_config.hidden_act, "config.json vision_config")
    views = FusedWeightViews()
    for index, block in enumerate(model.get_submodule(blocks_path)):
        attention, mlp = block.attn, block.mlp
        if hasattr(attention, "_per_window_forward"):
            raise ValueError("use_fast_vision_blocks was already applied to this model")
        attention._per_window_forward = attention.forward
        attention.forward = types.MethodType(_grouped_vision_attention_forward, attention)
        prefix = f"{blocks_path}.{index}.mlp"
        views.add(prefix, concatenate_projections(mlp, MLP_PARTS, "gate_up_proj", MLP_ALIGN), MLP_PARTS)
        mlp.down_proj = InputPaddedLinear(mlp.down_proj, MLP_ALIGN)
        views.add_input_padded(f"{prefix}.down_proj", mlp.down_proj)
        block.forward = types.MethodType(_fused_block_forward, block)
    return views

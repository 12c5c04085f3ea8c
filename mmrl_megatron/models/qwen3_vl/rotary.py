"""Qwen3-VL's interleaved multimodal RoPE, in the place of megatron-core's sectioned one.

Qwen2.5-VL gives each position axis a contiguous block of rotary frequencies ([t t t h h w w]), which
megatron-core's MultimodalRotaryEmbedding computes from `mrope_section`. Qwen3-VL interleaves them: frequency
j follows the height axis when j % 3 == 1 and j < 3 * sections[1], the width axis when j % 3 == 2 and
j < 3 * sections[2], and the temporal axis otherwise (transformers' Qwen3VLTextRotaryEmbedding.
recomposition_frequencies). No megatron setting expresses that, so this subclass keeps megatron's inverse
frequencies and forward contract and changes only which axis each frequency reads; the angles then go
through megatron's ordinary (non-interleaved, rotate-half) application, as transformers applies them.
"""
from typing import List, Sequence

import torch
from megatron.core.models.common.embeddings.rotary_pos_embedding import (
    MultimodalRotaryEmbedding, get_pos_emb_on_this_cp_rank)


def interleaved_axes(mrope_section: Sequence[int]) -> torch.Tensor:
    """LongTensor[sum(mrope_section)]: which position axis (0 t, 1 h, 2 w) each rotary frequency reads."""
    axes = torch.zeros(sum(mrope_section), dtype=torch.long)
    for axis in (1, 2):
        axes[axis:3 * mrope_section[axis]:3] = axis
    return axes


class InterleavedMultimodalRotaryEmbedding(MultimodalRotaryEmbedding):
    """forward(position_ids [3, b, s], mrope_section) -> angles [s, b, 1, head_dim] (GPTModel's contract)."""

    def forward(self, position_ids: torch.Tensor, mrope_section: List[int], cp_group=None) -> torch.Tensor:
        positions = position_ids.to(device=self.inv_freq.device, dtype=torch.float32)
        freqs = positions[..., None] * self.inv_freq  # [3, b, s, head_dim / 2]
        axes = interleaved_axes(mrope_section).to(freqs.device)
        chosen = freqs.gather(0, axes.expand(1, *freqs.shape[1:3], -1))[0]  # [b, s, head_dim / 2]
        angles = torch.cat((chosen, chosen), dim=-1)[:, :, None, :].transpose(0, 1).contiguous()
        cp_group = cp_group if cp_group is not None else self.cp_group
        if cp_group is not None and cp_group.size() > 1:
            angles = get_pos_emb_on_this_cp_rank(angles, 0, cp_group)
        return angles

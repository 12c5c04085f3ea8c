"""Rotary embeddings in one kernel each way on GPUs without Transformer Engine.

Without TE, megatron-core applies RoPE unfused: cos, sin, the rotate-half concatenation, two products, a
sum and a concatenation with the unrotated tail, each a full pass over the query or key, in every layer and
again in backward (about 7% of a scoring pass on an H200 at the 3B shape). With config.apply_rope_fusion it
calls `rope_utils.fused_apply_rotary_pos_emb`, a slot it reads at call time and that TE fills when it
imports. Where TE is absent, `fused_rope_available` fills the slot with the same arithmetic compiled by
torch.compile (one Triton kernel forward, one backward), so the layers keep megatron's own attention code.
Only the non-interleaved layout Qwen uses is provided; megatron takes the slot only for sbhd input with
batch 1 (packing.as_one_stream) and no attention scaling (mscale 1), as TE's kernel.
"""
import functools

import torch


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def _rotary(t: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """t [s, b, heads, dim] rotated by angles freqs [s, 1, 1, rot_dim] on its first rot_dim channels."""
    rotated_width = freqs.shape[-1]
    rotated, untouched = t[..., :rotated_width], t[..., rotated_width:]
    cos, sin = freqs.cos().to(t.dtype), freqs.sin().to(t.dtype)
    return torch.cat((rotated * cos + _rotate_half(rotated) * sin, untouched), dim=-1)


@functools.lru_cache(maxsize=None)
def _compiled_rotary():
    # dynamic: every micro-batch has another token count, which would otherwise recompile
    return torch.compile(_rotary, dynamic=True)


def compiled_rotary_pos_emb(t: torch.Tensor, freqs: torch.Tensor, transpose_output_memory: bool = False,
                            interleaved: bool = False) -> torch.Tensor:
    """TE's fused_apply_rotary_pos_emb contract (the arguments megatron-core passes)."""
    if interleaved:
        raise NotImplementedError("the compiled RoPE covers the non-interleaved layout only; "
                                  "set rotary_interleaved=False or install Transformer Engine")
    return _compiled_rotary()(t, freqs)


def fused_rope_available() -> bool:
    """Whether config.apply_rope_fusion can be set: TE's kernel, or on a GPU the compiled one (installed
    here into megatron-core's slot); False on the CPU, where the unfused path is the exact one."""
    from megatron.core.models.common.embeddings import rope_utils

    if rope_utils.fused_apply_rotary_pos_emb is not None:
        return True
    if not torch.cuda.is_available():
        return False
    rope_utils.fused_apply_rotary_pos_emb = compiled_rotary_pos_emb
    return True

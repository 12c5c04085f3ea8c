"""Rotary embeddings in one kernel each way on GPUs without Transformer Engine.

Without TE, megatron-core applies RoPE unfused: cos, sin, the rotate-half concatenation, two products, a
sum and a concatenation with the unrotated tail, each a full pass over the query or key, in every layer and
again in backward (about 7% of a scoring pass on an H200 at the 3B shape). With config.apply_rope_fusion it
calls `rope_utils.fused_apply_rotary_pos_emb`, a slot it reads at call time and that TE fills when it
imports. Where TE is absent, `fused_rope_available` fills the slot with `fused_rotary_pos_emb`: a fully
rotated head (every language model here) goes through layer_kernels' Triton kernel, which takes cos and sin of
the angles itself and writes token-major output (in a 3B update step of 4 x 4,096 tokens on an H200,
torch.compile's dynamic-shape kernel for the same arithmetic took 21 ms, this one 4.0 ms); a partly rotated
head keeps the compiled arithmetic. Only the non-interleaved layout Qwen uses is provided; megatron takes the
slot only for sbhd input with batch 1 (packing.as_one_stream) and no attention scaling (mscale 1), as TE's
kernel.
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


class _TritonRotary(torch.autograd.Function):
    """t [s, 1, heads, dim] rotated by freqs [s, 1, 1, dim] over its whole width; backward applies the
    rotation's transpose to the gradient."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(freqs)
        return _rotate_tokens(t, freqs, transpose=False)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (freqs,) = ctx.saved_tensors
        return _rotate_tokens(grad, freqs, transpose=True), None


def _rotate_tokens(t: torch.Tensor, freqs: torch.Tensor, transpose: bool) -> torch.Tensor:
    from .layer_kernels import rotate_by_angles  # Triton: present wherever CUDA tensors are

    angles = freqs.reshape(freqs.shape[0], freqs.shape[-1])
    return rotate_by_angles(t.flatten(0, 1), angles, transpose).view(t.shape)


def fused_rotary_pos_emb(t: torch.Tensor, freqs: torch.Tensor, transpose_output_memory: bool = False,
                         interleaved: bool = False) -> torch.Tensor:
    """TE's fused_apply_rotary_pos_emb contract (the arguments megatron-core passes)."""
    if interleaved:
        raise NotImplementedError("the fused RoPE covers the non-interleaved layout only; "
                                  "set rotary_interleaved=False or install Transformer Engine")
    if t.is_cuda and t.shape[1] == 1 and freqs.shape[1] == 1 and freqs.shape[-1] == t.shape[-1]:
        return _TritonRotary.apply(t, freqs)
    return _compiled_rotary()(t, freqs)


def fused_rope_available() -> bool:
    """Whether config.apply_rope_fusion can be set: TE's kernel, or on a GPU fused_rotary_pos_emb (installed
    here into megatron-core's slot); False on the CPU, where the unfused path is the exact one."""
    from megatron.core.models.common.embeddings import rope_utils

    if rope_utils.fused_apply_rotary_pos_emb is not None:
        return True
    if not torch.cuda.is_available():
        return False
    rope_utils.fused_apply_rotary_pos_emb = fused_rotary_pos_emb
    return True

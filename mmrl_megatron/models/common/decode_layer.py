"""One Qwen-style decoder layer (RMSNorm, grouped-query attention with RoPE and optional QK-norm, SwiGLU MLP)
over transformers' own weights, for the embedded engine's prefill and decode.

The arithmetic is HF's layer's (Qwen2_5_VLDecoderLayer, Qwen3VLTextDecoderLayer), written out so that its
elementwise work runs fused on a GPU: HF's modules run each step as chains of small kernels (the norm alone
is seven: upcast, square, mean, add, rsqrt, multiply, downcast), each a pass over the hidden states that
costs more than its arithmetic. Here the norms are torch's fused rms_norm (bf16 weights, as the checkpoints
and the trainer's norms keep them), the residual sum with the norm after it is one compiled kernel (a layer's
MLP output is summed in the next layer's norm kernel), the rotary embedding and the SwiGLU are one Triton
kernel each (layer_kernels.py), all on CUDA only (eager on the CPU, the exact path the parity tests compare),
and the q/k/v and gate/up projections are one GEMM each (fused_projections.py). On an H200 (3B, 256 prompts,
16 new tokens) one generate call launched 37,446 kernels through HF's modules and 20,526 through these.
"""
import functools
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ..errors import ModelError
from .compile_limits import allow_compiled_variants


def check_swiglu(hidden_act: str, where: str) -> None:
    """The layers here run SwiGLU (SiLU-gated MLPs), as every Qwen-VL release does."""
    if hidden_act != "silu":
        raise ModelError(f"{where}: hidden_act is {hidden_act!r}; the embedded engine's layers run SwiGLU (silu)")


def rms_norm(hidden: torch.Tensor, norm: torch.nn.Module) -> torch.Tensor:
    """HF's RMSNorm module `norm` (weight, variance_epsilon) applied by torch's fused kernel."""
    return F.rms_norm(hidden, (hidden.shape[-1],), norm.weight, norm.variance_epsilon)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def rotary(query: torch.Tensor, key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """query/key [B, L, heads, D] and cos/sin [B, L, D] -> rotated query/key as [B, heads, L, D] views (HF's
    apply_rotary_pos_emb, in the layout the projections produce): layer_kernels' kernel on CUDA."""
    if query.is_cuda:
        from .layer_kernels import rotate_query_key  # Triton: present wherever CUDA tensors are

        batch, length, _, width = query.shape
        rotated = rotate_query_key(*(x.flatten(0, 1) for x in (query, key, cos, sin)))
        return tuple(x.view(batch, length, -1, width).transpose(1, 2) for x in rotated)
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    rotated_query = query * cos + _rotate_half(query) * sin
    rotated_key = key * cos + _rotate_half(key) * sin
    return rotated_query.transpose(1, 2), rotated_key.transpose(1, 2)


def rotated(query: torch.Tensor, key: torch.Tensor, rotation):
    """query/key [B, heads, L, D] rotated by rotation = (cos, sin) [B, L, D], as rotary(); rotation None: they
    come rotated."""
    if rotation is None:
        return query, key
    return rotary(query.transpose(1, 2), key.transpose(1, 2), *rotation)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up: layer_kernels' kernel on CUDA."""
    if gate.is_cuda:
        from . import layer_kernels  # Triton: present wherever CUDA tensors are

        return layer_kernels.swiglu(gate, up)
    return F.silu(gate) * up


@functools.lru_cache(maxsize=None)
def _compiled(function: Callable) -> Callable:
    # One engine sees many input variants (prefill and decode shapes, the tower's and the language model's
    # strides); past dynamo's default of 8 a function silently runs eagerly (on an H200 add_rms_norm did, in the
    # 7B image workload after the 3B text one).
    allow_compiled_variants()
    # dynamic: the batch bucket, the prompt length and the KV length change between calls
    return torch.compile(function, dynamic=True)


def fused(function: Callable, tensor: torch.Tensor) -> Callable:
    """The compiled `function` for CUDA tensors, the eager one elsewhere."""
    return _compiled(function) if tensor.is_cuda else function


def add_rms_norm(hidden: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, epsilon: float):
    """The residual sum and its RMS norm: one kernel when compiled (two passes over the hidden states eager)."""
    hidden = hidden + delta
    return hidden, F.rms_norm(hidden, (hidden.shape[-1],), weight, epsilon)


def residual_norm(hidden: torch.Tensor, pending: Optional[torch.Tensor], norm: torch.nn.Module):
    """(hidden + pending, its RMS norm by HF's RMSNorm module `norm`); pending None adds nothing."""
    if pending is None:
        return hidden, rms_norm(hidden, norm)
    return fused(add_rms_norm, hidden)(hidden, pending, norm.weight, norm.variance_epsilon)


def with_pending(hidden: torch.Tensor, pending: Optional[torch.Tensor]) -> torch.Tensor:
    """The layer stack's output once the last layer's pending MLP output is added."""
    return hidden if pending is None else hidden + pending


def qwen_decoder_layer(layer: torch.nn.Module, hidden: torch.Tensor, pending: Optional[torch.Tensor],
                       cos: torch.Tensor, sin: torch.Tensor, attend: Callable, layer_index: int, head_dim: int):
    """HF decoder layer `layer` over hidden + pending [B, L, H] with the rotary cos/sin [B, L, D] of its
    positions; returns (hidden, pending) whose sum is the layer's output. `pending` is the previous layer's MLP
    output (None before the first layer): its residual sum runs in the same kernel as this layer's first norm,
    not as a pass of its own. The attention core is attend(layer_index, query [B, heads, L, D],
    key, value [B, kv_heads, L, D], (cos, sin)) -> [B, heads, L, D]; it rotates the query and key itself (the
    decode kernel does so inside). The layer's projections are concatenated
    (fused_projections.fuse_layer_projections: `self_attn.qkv_proj`, `mlp.gate_up_proj`). QK-norm (Qwen3)
    applies when the attention module has q_norm/k_norm."""
    attention = layer.self_attn
    batch, length, _ = hidden.shape
    heads_shape = (batch, length, -1, head_dim)
    hidden, normed = residual_norm(hidden, pending, layer.input_layernorm)
    query, key, value = (part.view(heads_shape) for part in attention.qkv_proj(normed))
    if hasattr(attention, "q_norm"):
        query, key = rms_norm(query, attention.q_norm), rms_norm(key, attention.k_norm)
    attended = attend(layer_index, query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), (cos, sin))
    hidden, normed = residual_norm(
        hidden, attention.o_proj(attended.transpose(1, 2).reshape(batch, length, -1)), layer.post_attention_layernorm)
    mlp = layer.mlp
    gate, up = mlp.gate_up_proj(normed)
    return hidden, mlp.down_proj(swiglu(gate, up))

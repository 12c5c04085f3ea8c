"""Triton kernels for two elementwise steps of the engine's layers, the rotary embedding of queries and keys
and SwiGLU, and for the trainer's rotary embedding (megatron-core's angles in, forward and backward).

torch.compile fuses each into one kernel too (decode_layer.fused), but compiled for dynamic shapes it reads
the projections' strided outputs without vector loads, and the rotary embedding wrote its outputs in the
attention's [batch, heads, length, width] order: on an H200 the 3B text prefill spent 45 ms of 670 in the
rotary kernels (about a ninth of the copy bandwidth) and 91 ms in SwiGLU (a third), the 7B image prefill
222 ms and 320 ms, and a decode step at batch 256 0.4 ms and 0.39 ms (RESULTS.md, 2026-12-03 second session).
Here one program covers one token's heads (rotary) or one block of one row (SwiGLU), with fixed block sizes
(Triton specialises on the strides' divisibility by 16, which the compiled dynamic-shape kernels could not
assume), and outputs are written in the inputs' token-major order (the attention takes the transposed views).

Both compute in fp32 and round once, as the compiled kernels do (HF's eager modules round after each
operation: the bf16 results differ from theirs by at most one bf16 step). They run on CUDA tensors, and
under TRITON_INTERPRET=1 on CPU tensors (the tests); the engine's CPU path keeps the eager functions.
"""
from typing import Tuple

import torch
import triton
import triton.language as tl

SWIGLU_BLOCK = 1024  # columns per program


@triton.jit
def _rotate_heads(source, target, token, stride_t, stride_h, count, half, columns, inside, cos_first, cos_second,
                  sin_first, sin_second, BLOCK_H: tl.constexpr):
    """Token `token`'s `count` heads of `source` rotated into the contiguous `target`."""
    heads = tl.arange(0, BLOCK_H)
    mask = (heads[:, None] < count) & inside[None, :]
    cells = token * stride_t + heads[:, None] * stride_h + columns[None, :]
    first = tl.load(source + cells, mask=mask, other=0.0).to(tl.float32)
    second = tl.load(source + cells + half, mask=mask, other=0.0).to(tl.float32)
    out_cells = (token * count + heads[:, None]) * (2 * half) + columns[None, :]
    dtype = target.dtype.element_ty
    tl.store(target + out_cells, (first * cos_first[None, :] - second * sin_first[None, :]).to(dtype), mask=mask)
    tl.store(target + out_cells + half, (second * cos_second[None, :] + first * sin_second[None, :]).to(dtype),
             mask=mask)


@triton.jit
def _rotary_kernel(query, key, cos, sin, query_out, key_out, query_stride_t, query_stride_h, key_stride_t,
                   key_stride_h, cos_stride_t, sin_stride_t, query_heads, key_heads, half,
                   BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """Program t: token t's query and key heads rotated (x * cos + rotate_half(x) * sin)."""
    token = tl.program_id(0).to(tl.int64)
    columns = tl.arange(0, BLOCK_HALF)
    inside = columns < half
    cos_first = tl.load(cos + token * cos_stride_t + columns, mask=inside, other=0.0).to(tl.float32)
    cos_second = tl.load(cos + token * cos_stride_t + half + columns, mask=inside, other=0.0).to(tl.float32)
    sin_first = tl.load(sin + token * sin_stride_t + columns, mask=inside, other=0.0).to(tl.float32)
    sin_second = tl.load(sin + token * sin_stride_t + half + columns, mask=inside, other=0.0).to(tl.float32)
    _rotate_heads(query, query_out, token, query_stride_t, query_stride_h, query_heads, half, columns, inside,
                  cos_first, cos_second, sin_first, sin_second, BLOCK_H)
    _rotate_heads(key, key_out, token, key_stride_t, key_stride_h, key_heads, half, columns, inside,
                  cos_first, cos_second, sin_first, sin_second, BLOCK_H)


@triton.jit
def _angle_rotary_kernel(source, target, angles, stride_t, stride_h, angle_stride_t, heads, half,
                         TRANSPOSE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """Program t: token t's heads rotated by its row of angles (cos and sin taken here, in fp32). TRANSPOSE
    applies the rotation's transpose, which is its backward: x1 * cos1 + x2 * sin2, x2 * cos2 - x1 * sin1 for
    the halves x1, x2 (the rotation by the negated angles when both halves hold the same angles, as RoPE's do)."""
    token = tl.program_id(0).to(tl.int64)
    columns = tl.arange(0, BLOCK_HALF)
    inside = columns < half
    first = tl.load(angles + token * angle_stride_t + columns, mask=inside, other=0.0).to(tl.float32)
    second = tl.load(angles + token * angle_stride_t + half + columns, mask=inside, other=0.0).to(tl.float32)
    sin_first, sin_second = tl.sin(first), tl.sin(second)
    if TRANSPOSE:
        sin_first, sin_second = -sin_second, -sin_first
    _rotate_heads(source, target, token, stride_t, stride_h, heads, half, columns, inside, tl.cos(first),
                  tl.cos(second), sin_first, sin_second, BLOCK_H)


def rotate_by_angles(x: torch.Tensor, angles: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """x [T, heads, D] (any token and head strides, unit column stride) rotated by angles [T, D] as
    megatron-core's unfused RoPE does (x * cos + rotate_half(x) * sin) -> a contiguous tensor of x's shape and
    dtype; transpose: the rotation's transpose (the backward of the rotation)."""
    tokens, heads, width = x.shape
    x, angles = (t if t.stride(-1) == 1 else t.contiguous() for t in (x, angles))
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if tokens:
        # one warp per token: on an H200 at 4,096 tokens the 16 x 128 query took 15.0 us with one warp, 18.2
        # with two, 35.0 with four (a copy of it 13.7 us); the 2 x 128 key 8.0 / 7.8 / 9.6
        _angle_rotary_kernel[(tokens,)](
            x, out, angles, x.stride(0), x.stride(1), angles.stride(0), heads, width // 2, TRANSPOSE=transpose,
            BLOCK_H=triton.next_power_of_2(heads), BLOCK_HALF=triton.next_power_of_2(width // 2), num_warps=1)
    return out


def rotate_query_key(query: torch.Tensor, key: torch.Tensor, cos: torch.Tensor,
                     sin: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """query [T, heads, D] and key [T, kv_heads, D] (any token and head strides, unit column stride) rotated by
    cos/sin [T, D] as HF's apply_rotary_pos_emb does -> contiguous tensors of their shapes and dtype."""
    tokens, query_heads, width = query.shape
    key_heads = key.shape[1]
    query, key, cos, sin = (x if x.stride(-1) == 1 else x.contiguous() for x in (query, key, cos, sin))
    query_out, key_out = (torch.empty(x.shape, dtype=x.dtype, device=x.device) for x in (query, key))
    if tokens:
        _rotary_kernel[(tokens,)](
            query, key, cos, sin, query_out, key_out, query.stride(0), query.stride(1), key.stride(0), key.stride(1),
            cos.stride(0), sin.stride(0), query_heads, key_heads, width // 2,
            BLOCK_H=triton.next_power_of_2(max(query_heads, key_heads)),
            BLOCK_HALF=triton.next_power_of_2(width // 2), num_warps=4)
    return query_out, key_out


@triton.jit
def _swiglu_kernel(gate, up, out, columns, gate_stride, up_stride, BLOCK: tl.constexpr):
    """Program (row, block): silu(gate) * up over one block of one row; out contiguous."""
    row = tl.program_id(0).to(tl.int64)
    cells = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = cells < columns
    g = tl.load(gate + row * gate_stride + cells, mask=inside, other=0.0).to(tl.float32)
    u = tl.load(up + row * up_stride + cells, mask=inside, other=0.0).to(tl.float32)
    tl.store(out + row * columns + cells, (g * tl.sigmoid(g) * u).to(out.dtype.element_ty), mask=inside)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate, up [..., C] whose leading dimensions flatten to rows of one stride each (the
    split outputs of one GEMM, or contiguous tensors) -> contiguous [..., C]."""
    columns = gate.shape[-1]
    gate_rows, up_rows = gate.reshape(-1, columns), up.reshape(-1, columns)  # views for such layouts
    gate_rows, up_rows = (x if x.stride(-1) == 1 else x.contiguous() for x in (gate_rows, up_rows))
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    rows = gate_rows.shape[0]
    if rows:
        _swiglu_kernel[(rows, triton.cdiv(columns, SWIGLU_BLOCK))](
            gate_rows, up_rows, out, columns, gate_rows.stride(0), up_rows.stride(0), BLOCK=SWIGLU_BLOCK,
            num_warps=4)
    return out

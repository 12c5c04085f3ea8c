"""Decode attention over the static KV cache in two Triton kernels (flash-decoding), each row to its own length.

The engine's decode step attends one new token per slot to that slot's cached keys and values. Through SDPA
it did so over the whole KV-length bucket with an additive mask, and the fused kernels pad a KV head's query
rows (8 for Qwen2.5-VL-3B) to a 64-row tile: on an H200 2.0 ms of an 8.9 ms step at batch 256 and KV length
512 (RESULTS.md 2026-12-02). Here one program reads one split of one slot's cache for one KV head, only up to
the slot's length, with all of that head's query rows in one 16-row tile (grouped-query attention without
repeating the cache); a second kernel merges the splits' partial softmaxes. The grid depends only on the
batch bucket and the KV-length bucket and the lengths are read on the device, so the step stays one CUDA graph.

Written here because neither torch nor the libraries this project depends on provide a decode kernel over
this cache layout ([slots, kv_heads, max_len, width]) with per-row lengths; SGLang's and vLLM's are tied to
their paged caches. Any key and value width (padded to a power of two inside); cached_decoder.py decides which
caches take it. The kernels run on CUDA tensors, and under TRITON_INTERPRET=1 on CPU tensors (the tests); there
the dot products' operands are widened to fp32 first (WIDEN), because Triton 3.9's interpreter miscomputes
tl.dot of bf16 operands. Products of bf16 values are exact in fp32 and the GPU's bf16 dot accumulates in fp32
too, so only the order of the sums differs.
"""
import math

import torch
import triton
import triton.language as tl

BLOCK_KEYS = 64  # cached positions per step of a program's loop
MIN_DOT_SIZE = 16  # tl.dot's smallest tile side: query rows and widths are padded up to it (masked)
TARGET_PROGRAMS = 1024  # splits are added until slots x KV heads x splits reaches this (an H200 has 132 SMs)


@triton.jit
def _split_kernel(query, keys, values, lengths, partial_out, partial_max, partial_sum,
                  query_stride_b, query_stride_h, query_stride_g, key_stride_b, key_stride_h, key_stride_n,
                  value_stride_b, value_stride_h, value_stride_n, groups, key_width, value_width, split_size,
                  scale_log2, ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                  BLOCK_DV: tl.constexpr, WIDEN: tl.constexpr):
    """Program (slot b, KV head h, split s): the softmax-weighted values of positions [s*split, (s+1)*split)
    below the slot's length, unnormalised, with the rows' running maximum (log2 units) and sum."""
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    start = split * split_size
    end = tl.minimum(start + split_size, tl.load(lengths + b))
    rows = tl.arange(0, ROWS)
    dims = tl.arange(0, BLOCK_D)
    value_dims = tl.arange(0, BLOCK_DV)
    q = tl.load(query + b * query_stride_b + h * query_stride_h + rows[:, None] * query_stride_g + dims[None, :],
                mask=(rows[:, None] < groups) & (dims[None, :] < key_width), other=0.0)
    if WIDEN:
        q = q.to(tl.float32)
    key_base = keys + b * key_stride_b + h * key_stride_h
    value_base = values + b * value_stride_b + h * value_stride_h
    running_max = tl.full([ROWS], float("-inf"), tl.float32)
    running_sum = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, BLOCK_DV], tl.float32)
    for offset in range(start, end, BLOCK_N):
        positions = offset + tl.arange(0, BLOCK_N)
        inside = positions < end
        k = tl.load(key_base + positions[None, :] * key_stride_n + dims[:, None],
                    mask=inside[None, :] & (dims[:, None] < key_width), other=0.0)
        if WIDEN:
            k = k.to(tl.float32)
        scores = tl.where(inside[None, :], tl.dot(q, k) * scale_log2, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, axis=1))
        rescale = tl.exp2(running_max - new_max)
        weights = tl.exp2(scores - new_max[:, None])
        running_sum = running_sum * rescale + tl.sum(weights, axis=1)
        v = tl.load(value_base + positions[:, None] * value_stride_n + value_dims[None, :],
                    mask=inside[:, None] & (value_dims[None, :] < value_width), other=0.0)
        weights = weights.to(v.dtype)  # the dot's operands in the cache's dtype, as flash kernels take them
        if WIDEN:
            weights, v = weights.to(tl.float32), v.to(tl.float32)
        acc = acc * rescale[:, None] + tl.dot(weights, v)
        running_max = new_max
    index = (b * tl.num_programs(1) + h) * tl.num_programs(2) + split
    tl.store(partial_out + index * ROWS * BLOCK_DV + rows[:, None] * BLOCK_DV + value_dims[None, :], acc)
    tl.store(partial_max + index * ROWS + rows, running_max)
    tl.store(partial_sum + index * ROWS + rows, running_sum)


@triton.jit
def _merge_kernel(partial_out, partial_max, partial_sum, out, out_stride_b, out_stride_head, groups, value_width,
                  splits, ROWS: tl.constexpr, BLOCK_DV: tl.constexpr):
    """Program (slot b, KV head h): the splits' partial softmaxes merged into the attention output of the
    head's query rows (query head h * groups + row)."""
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    rows = tl.arange(0, ROWS)
    value_dims = tl.arange(0, BLOCK_DV)
    first = (b * tl.num_programs(1) + h) * splits
    peak = tl.full([ROWS], float("-inf"), tl.float32)
    for split in range(0, splits):
        peak = tl.maximum(peak, tl.load(partial_max + (first + split) * ROWS + rows))
    peak = tl.where(peak == float("-inf"), 0.0, peak)  # a row no split saw: its weights are all 0
    total = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, BLOCK_DV], tl.float32)
    for split in range(0, splits):
        index = first + split
        weight = tl.exp2(tl.load(partial_max + index * ROWS + rows) - peak)
        total += weight * tl.load(partial_sum + index * ROWS + rows)
        acc += weight[:, None] * tl.load(partial_out + index * ROWS * BLOCK_DV + rows[:, None] * BLOCK_DV
                                         + value_dims[None, :])
    result = acc / tl.where(total > 0, total, 1.0)[:, None]
    heads = h * groups + rows
    tl.store(out + b * out_stride_b + heads[:, None] * out_stride_head + value_dims[None, :],
             result.to(out.dtype.element_ty), mask=(rows[:, None] < groups) & (value_dims[None, :] < value_width))


def split_count(slots: int, kv_heads: int, kv_len: int) -> int:
    """Splits per (slot, KV head): enough programs to fill the GPU, none shorter than one loop step."""
    wanted = math.ceil(TARGET_PROGRAMS / (slots * kv_heads))
    return max(1, min(wanted, math.ceil(kv_len / BLOCK_KEYS)))


def decode_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor,
                     kv_len: int, scale: float) -> torch.Tensor:
    """query [B, heads, D] (heads = kv_heads x groups, consecutive heads share a KV head), keys [B, kv_heads, N, D]
    and values [B, kv_heads, N, DV] (cache views), lengths [B] int (positions [0, length) of each slot are
    attended; at most kv_len <= N) -> [B, heads, DV] in the query's dtype."""
    if query.stride(-1) != 1:
        query = query.contiguous()
    batch, heads, key_width = query.shape
    kv_heads, value_width = keys.shape[1], values.shape[-1]
    groups = heads // kv_heads
    rows = max(MIN_DOT_SIZE, triton.next_power_of_2(groups))
    block_d = max(MIN_DOT_SIZE, triton.next_power_of_2(key_width))
    block_dv = max(MIN_DOT_SIZE, triton.next_power_of_2(value_width))
    splits = split_count(batch, kv_heads, kv_len)
    split_size = BLOCK_KEYS * math.ceil(math.ceil(kv_len / BLOCK_KEYS) / splits)
    partial = (batch, kv_heads, splits, rows)
    partial_out = torch.empty(*partial, block_dv, dtype=torch.float32, device=query.device)
    partial_max = torch.empty(partial, dtype=torch.float32, device=query.device)
    partial_sum = torch.empty(partial, dtype=torch.float32, device=query.device)
    _split_kernel[(batch, kv_heads, splits)](
        query, keys, values, lengths, partial_out, partial_max, partial_sum,
        query.stride(0), groups * query.stride(1), query.stride(1), keys.stride(0), keys.stride(1), keys.stride(2),
        values.stride(0), values.stride(1), values.stride(2), groups, key_width, value_width, split_size,
        scale * math.log2(math.e), ROWS=rows, BLOCK_N=BLOCK_KEYS, BLOCK_D=block_d,
        BLOCK_DV=block_dv, WIDEN=not query.is_cuda, num_warps=4)
    out = torch.empty(batch, heads, value_width, dtype=query.dtype, device=query.device)
    _merge_kernel[(batch, kv_heads)](partial_out, partial_max, partial_sum, out, out.stride(0), out.stride(1), groups,
                                     value_width, splits, ROWS=rows, BLOCK_DV=block_dv, num_warps=4)
    return out

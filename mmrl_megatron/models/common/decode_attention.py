"""Decode attention over the static KV cache in two Triton kernels (flash-decoding), each row to its own length.

The engine's decode step attends one new token per slot to that slot's cached keys and values. Through SDPA
it did so over the whole KV-length bucket with an additive mask, and the fused kernels pad a KV head's query
rows (8 for Qwen2.5-VL-3B) to a 64-row tile: on an H200 2.0 ms of an 8.9 ms step at batch 256 and KV length
512 (RESULTS.md 2026-12-02). Here one program reads one split of one slot's cache for one KV head, only up to
the slot's length, with all of that head's query rows in one 16-row tile (grouped-query attention without
repeating the cache), and the program whose split holds the new token's position writes its key and value
into the cache (no separate cache-write kernels) and attends to them from registers; the query and the new
key can arrive unrotated, and are rotated in the kernel (no rotary kernel per layer). Where a row has several
splits, a second kernel merges their partial softmaxes; with one split the programs write the output. The
grid depends only on the batch bucket and the KV-length bucket and the lengths are read on the device, so the
step stays one CUDA graph.

Written here because neither torch nor the libraries this project depends on provide a decode kernel over
this cache layout ([slots, kv_heads, max_len, width]) with per-row lengths; SGLang's and vLLM's are tied to
their paged caches. Any key and value width (padded to a power of two inside); cached_decoder.py decides which
caches take it. The kernels run on CUDA tensors, and under TRITON_INTERPRET=1 on CPU tensors (the tests); there
the dot products' operands are widened to fp32 first (WIDEN), because Triton 3.9's interpreter miscomputes
tl.dot of bf16 operands. Products of bf16 values are exact in fp32 and the GPU's bf16 dot accumulates in fp32
too, so only the order of the sums differs.
"""
import math
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

# Launch settings from a graph-replayed sweep on an H200 (RESULTS.md 2026-12-03, third session; batch 1 to 320, 300
# to 2,000 cached positions, 3B and 7B heads: among the five fastest settings at five of the seven shapes, the 3B
# text and 7B image ones included): no more splits than bring slots x KV heads to TARGET_PROGRAMS (at batch 256, one
# split: the merge's kernel and partial sums had cost more than the splits' parallelism gave).
BLOCK_KEYS = 64  # cached positions per step of a program's loop
SPLIT_WARPS = 4
SPLIT_STAGES = 2
MIN_DOT_SIZE = 16  # tl.dot's smallest tile side: query rows and widths are padded up to it (masked)
TARGET_PROGRAMS = 512  # splits are added until slots x KV heads x splits reaches this (an H200 has 132 SMs)
MAX_SPLITS = 64  # the merge holds all of a row's splits in one tile: [MAX_SPLITS, value width] fp32


@triton.jit
def _rotate(x, partner, cos, sin, first_half):
    """x * cos + rotate_half(x) * sin in fp32 (HF's apply_rotary_pos_emb), with partner = x's other half and
    the operations in layer_kernels' order."""
    return tl.where(first_half, x * cos - partner * sin, x * cos + partner * sin)


@triton.jit
def _split_kernel(query, new_keys, new_values, keys, values, write_positions, lengths, cos, sin, partial_out,
                  partial_max, partial_sum, out, query_stride_b, query_stride_h, query_stride_g, new_key_stride_b,
                  new_key_stride_h, new_value_stride_b, new_value_stride_h, key_stride_b, key_stride_h, key_stride_n,
                  value_stride_b, value_stride_h, value_stride_n, cos_stride_b, sin_stride_b, out_stride_b,
                  out_stride_head, groups, key_width, value_width, split_size, scale_log2, ROWS: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, WIDEN: tl.constexpr,
                  ROTATE: tl.constexpr, DIRECT: tl.constexpr):
    """Program (slot b, KV head h, split s): the softmax-weighted values of positions [s*split, (s+1)*split)
    below the slot's length. With ROTATE the query and the new key arrive unrotated and are rotated here by the
    slot's cos/sin, then rounded to their dtype as the rotary kernel rounds them. Positions below the write
    position come from the cache; the split that covers the write position stores the new token's key and value
    there and attends to them from registers, so no program reads the position being written and the loop's
    tiles go to the dot products as loaded. With one split (DIRECT) the program writes the normalised output;
    otherwise its unnormalised sums with the rows' running maximum (log2 units) and sum, for the merge."""
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    start = split * split_size
    length = tl.load(lengths + b)
    end = tl.minimum(start + split_size, length)
    write = tl.load(write_positions + b)
    cached_end = tl.minimum(end, write)
    rows = tl.arange(0, ROWS)
    dims = tl.arange(0, BLOCK_D)
    value_dims = tl.arange(0, BLOCK_DV)
    key_base = keys + b * key_stride_b + h * key_stride_h
    value_base = values + b * value_stride_b + h * value_stride_h
    query_cells = query + b * query_stride_b + h * query_stride_h + rows[:, None] * query_stride_g
    query_mask = (rows[:, None] < groups) & (dims[None, :] < key_width)
    q = tl.load(query_cells + dims[None, :], mask=query_mask, other=0.0)
    first_half = dims < key_width // 2
    partner = tl.where(first_half, dims + key_width // 2, dims - key_width // 2)  # the other half's column
    if ROTATE:
        cos_row = tl.load(cos + b * cos_stride_b + dims, mask=dims < key_width, other=0.0).to(tl.float32)
        sin_row = tl.load(sin + b * sin_stride_b + dims, mask=dims < key_width, other=0.0).to(tl.float32)
        q_partner = tl.load(query_cells + partner[None, :], mask=query_mask, other=0.0).to(tl.float32)
        q = _rotate(q.to(tl.float32), q_partner, cos_row[None, :], sin_row[None, :], first_half[None, :]).to(
            query.dtype.element_ty)
    if WIDEN:
        q = q.to(tl.float32)
    running_max = tl.full([ROWS], float("-inf"), tl.float32)
    running_sum = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, BLOCK_DV], tl.float32)
    for offset in range(start, cached_end, BLOCK_N):
        positions = offset + tl.arange(0, BLOCK_N)
        inside = positions < cached_end
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
    if (write >= start) & (write < end):  # positions past the length are never attended: nothing to store
        new_key_cells = new_keys + b * new_key_stride_b + h * new_key_stride_h
        new_key = tl.load(new_key_cells + dims, mask=dims < key_width, other=0.0)
        if ROTATE:
            cos_row = tl.load(cos + b * cos_stride_b + dims, mask=dims < key_width, other=0.0).to(tl.float32)
            sin_row = tl.load(sin + b * sin_stride_b + dims, mask=dims < key_width, other=0.0).to(tl.float32)
            key_partner = tl.load(new_key_cells + partner, mask=dims < key_width, other=0.0).to(tl.float32)
            new_key = _rotate(new_key.to(tl.float32), key_partner, cos_row, sin_row, first_half).to(
                new_keys.dtype.element_ty)
        new_value = tl.load(new_values + b * new_value_stride_b + h * new_value_stride_h + value_dims,
                            mask=value_dims < value_width, other=0.0)
        tl.store(key_base + write * key_stride_n + dims, new_key, mask=dims < key_width)
        tl.store(value_base + write * value_stride_n + value_dims, new_value, mask=value_dims < value_width)
        score = tl.sum(q.to(tl.float32) * new_key.to(tl.float32)[None, :], axis=1) * scale_log2
        new_max = tl.maximum(running_max, score)
        rescale = tl.exp2(running_max - new_max)
        weight = tl.exp2(score - new_max)
        running_sum = running_sum * rescale + weight
        weight = weight.to(new_value.dtype).to(tl.float32)  # rounded as the loop rounds its weights
        acc = acc * rescale[:, None] + weight[:, None] * new_value.to(tl.float32)[None, :]
        running_max = new_max
    if DIRECT:
        result = acc / tl.where(running_sum > 0, running_sum, 1.0)[:, None]
        head = h * groups + rows
        tl.store(out + b * out_stride_b + head[:, None] * out_stride_head + value_dims[None, :],
                 result.to(out.dtype.element_ty), mask=(rows[:, None] < groups) & (value_dims[None, :] < value_width))
    else:
        index = (b * tl.num_programs(1) + h) * tl.num_programs(2) + split
        tl.store(partial_out + index * ROWS * BLOCK_DV + rows[:, None] * BLOCK_DV + value_dims[None, :], acc)
        tl.store(partial_max + index * ROWS + rows, running_max)
        tl.store(partial_sum + index * ROWS + rows, running_sum)


@triton.jit
def _merge_kernel(partial_out, partial_max, partial_sum, out, out_stride_b, out_stride_head, value_width,
                  splits, ROWS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_DV: tl.constexpr):
    """Program (slot b, KV head h, query row r): the splits' partial softmaxes of query head h * groups + r
    merged, all splits in one tile (a loop over them was a chain of dependent loads: on an H200 about 0.8 ms of
    a 4 ms step for one slot at 2,048 cached positions)."""
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    row = tl.program_id(2)
    split_index = tl.arange(0, BLOCK_S)
    value_dims = tl.arange(0, BLOCK_DV)
    present = split_index < splits
    cells = ((b * tl.num_programs(1) + h) * splits + split_index) * ROWS + row  # [BLOCK_S] (split, row) cells
    maxima = tl.load(partial_max + cells, mask=present, other=float("-inf"))
    peak = tl.max(maxima, axis=0)
    peak = tl.where(peak == float("-inf"), 0.0, peak)  # a row no split saw: its weights are all 0
    weights = tl.exp2(maxima - peak)
    total = tl.sum(weights * tl.load(partial_sum + cells, mask=present, other=0.0), axis=0)
    partials = tl.load(partial_out + cells[:, None] * BLOCK_DV + value_dims[None, :], mask=present[:, None],
                       other=0.0)
    result = tl.sum(weights[:, None] * partials, axis=0) / tl.where(total > 0, total, 1.0)
    head = h * tl.num_programs(2) + row
    tl.store(out + b * out_stride_b + head * out_stride_head + value_dims, result.to(out.dtype.element_ty),
             mask=value_dims < value_width)


def split_count(slots: int, kv_heads: int, kv_len: int) -> int:
    """Splits per (slot, KV head): enough programs to fill the GPU, none shorter than one loop step, at most
    MAX_SPLITS."""
    wanted = min(math.ceil(TARGET_PROGRAMS / (slots * kv_heads)), MAX_SPLITS)
    return max(1, min(wanted, math.ceil(kv_len / BLOCK_KEYS)))


def decode_attention(query: torch.Tensor, new_keys: torch.Tensor, new_values: torch.Tensor, keys: torch.Tensor,
                     values: torch.Tensor, write_positions: torch.Tensor, lengths: torch.Tensor, kv_len: int,
                     scale: float, rotation: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
    """query [B, heads, D] (heads = kv_heads x groups, consecutive heads share a KV head), the new token's
    new_keys [B, kv_heads, D] and new_values [B, kv_heads, DV], keys [B, kv_heads, N, D] and values
    [B, kv_heads, N, DV] (cache views), write_positions and lengths [B] int -> [B, heads, DV] in the query's
    dtype. Stores the new key and value at each slot's write position when it lies below the slot's length,
    then attends to positions [0, length) (lengths at most kv_len <= N). rotation: (cos, sin) [B, D] to rotate
    the query and the new key by first (as HF's apply_rotary_pos_emb; one kernel fewer per layer than rotating
    them beforehand), or None when they arrive rotated."""
    cos, sin = (query, query) if rotation is None else rotation  # without a rotation the kernel never reads them
    query, new_keys, new_values, cos, sin = (x if x.stride(-1) == 1 else x.contiguous()
                                             for x in (query, new_keys, new_values, cos, sin))
    batch, heads, key_width = query.shape
    kv_heads, value_width = keys.shape[1], values.shape[-1]
    groups = heads // kv_heads
    rows = max(MIN_DOT_SIZE, triton.next_power_of_2(groups))
    block_d = max(MIN_DOT_SIZE, triton.next_power_of_2(key_width))
    block_dv = max(MIN_DOT_SIZE, triton.next_power_of_2(value_width))
    splits = split_count(batch, kv_heads, kv_len)
    split_size = BLOCK_KEYS * math.ceil(math.ceil(kv_len / BLOCK_KEYS) / splits)
    out = torch.empty(batch, heads, value_width, dtype=query.dtype, device=query.device)
    if splits == 1:  # the programs write the output: no partial sums
        partial_out = partial_max = partial_sum = out
    else:
        partial = (batch, kv_heads, splits, rows)
        partial_out = torch.empty(*partial, block_dv, dtype=torch.float32, device=query.device)
        partial_max = torch.empty(partial, dtype=torch.float32, device=query.device)
        partial_sum = torch.empty(partial, dtype=torch.float32, device=query.device)
    _split_kernel[(batch, kv_heads, splits)](
        query, new_keys, new_values, keys, values, write_positions, lengths, cos, sin, partial_out, partial_max,
        partial_sum, out, query.stride(0), query.stride(1) * groups, query.stride(1), new_keys.stride(0),
        new_keys.stride(1), new_values.stride(0), new_values.stride(1), keys.stride(0), keys.stride(1),
        keys.stride(2), values.stride(0), values.stride(1), values.stride(2), cos.stride(0), sin.stride(0),
        out.stride(0), out.stride(1), groups, key_width, value_width, split_size, scale * math.log2(math.e),
        ROWS=rows, BLOCK_N=BLOCK_KEYS, BLOCK_D=block_d, BLOCK_DV=block_dv, WIDEN=not query.is_cuda,
        ROTATE=rotation is not None, DIRECT=splits == 1, num_warps=SPLIT_WARPS, num_stages=SPLIT_STAGES)
    if splits > 1:
        _merge_kernel[(batch, kv_heads, groups)](partial_out, partial_max, partial_sum, out, out.stride(0),
                                                 out.stride(1), value_width, splits, ROWS=rows,
                                                 BLOCK_S=triton.next_power_of_2(splits), BLOCK_DV=block_dv,
                                                 num_warps=4)
    return out

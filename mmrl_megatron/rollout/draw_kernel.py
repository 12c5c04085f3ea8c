"""The decode step's draw and its log-prob in two Triton kernels, about one pass over each row of logits.

sampling.py draws by inverse CDF: softmax, a float64 cumulative sum over the whole vocabulary, a search,
and then log_softmax again for the token's log-prob; on an H200 about 1 ms of an 8.9 ms decode step at
batch 256 over 151,936 columns (RESULTS.md 2026-12-02), several full-width fp32/float64 tensors written and
read. Here the rows are read in their own dtype, in chunks of 8,192 columns: the first kernel gives each chunk's
maximum and sum of e^(x/T - max) (online, lane by lane, all chunks of all rows in parallel); the second combines
a row's chunks, finds the chunk whose cumulative sum first passes u x sum (the same uniform u the eager path
would use) and walks that chunk's cumulative sum block by block. Nothing of full width is written. One program
per row reading the whole row twice had been latency-bound: 125 us per step at batch 256 on an H200. This
covers plain temperature sampling (no top-k/top-p filtering, RL's usual setting); filtered and greedy draws
keep sampling.py.

The sums are fp32 in another order than the eager path's float64, so a uniform within about 1e-6 (relative)
of a CDF step can select the neighbouring token; the distribution is the same. Should rounding leave u x sum
above the walked total, the last token of non-zero probability (of the chosen chunk) is taken, as the eager
path's clamp does. Written here because torch has no fused inverse-CDF draw and the serving engines' samplers
(FlashInfer's) are not among this project's dependencies. The kernels run on CUDA tensors, and under
TRITON_INTERPRET=1 on CPU tensors (the tests).
"""
from typing import Tuple

import torch
import triton
import triton.language as tl

BLOCK_COLUMNS = 4096
CHUNK_BLOCKS = 2  # column blocks per chunk: a 151,936-column row is 19 chunks of 8,192
NUM_WARPS = 16


@triton.jit
def _chunk_kernel(logits, row_stride, columns, inverse_temperature, chunk_max, chunk_sum, chunks,
                  BLOCK: tl.constexpr, CHUNK_BLOCKS: tl.constexpr):
    """Program (row, chunk): the chunk's maximum of x/T and its sum of e^(x/T - maximum), online lane by
    lane."""
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    start = logits + row * row_stride
    lane_max = tl.full([BLOCK], float("-inf"), tl.float32)
    lane_sum = tl.zeros([BLOCK], tl.float32)
    for block in range(CHUNK_BLOCKS):
        cols = (chunk * CHUNK_BLOCKS + block) * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(start + cols, mask=cols < columns, other=float("-inf")).to(tl.float32) * inverse_temperature
        new_max = tl.maximum(lane_max, x)
        safe = tl.where(new_max == float("-inf"), 0.0, new_max)
        lane_sum = lane_sum * tl.exp(lane_max - safe) + tl.exp(x - safe)
        lane_max = new_max
    peak = tl.max(lane_max, axis=0)
    safe_peak = tl.where(peak == float("-inf"), 0.0, peak)
    total = tl.sum(tl.where(lane_max == float("-inf"), 0.0, lane_sum * tl.exp(lane_max - safe_peak)), axis=0)
    tl.store(chunk_max + row * chunks + chunk, peak)
    tl.store(chunk_sum + row * chunks + chunk, total)


@triton.jit
def _draw_kernel(logits, row_stride, columns, inverse_temperature, uniforms, chunk_max, chunk_sum, chunks, tokens,
                 logprobs, BLOCK: tl.constexpr, CHUNK_BLOCKS: tl.constexpr, CHUNK_TILE: tl.constexpr):
    """Program (row): the row's maximum and total from its chunks' sums, the chunk whose cumulative sum first
    passes u x total, and the walk over that chunk's columns only."""
    row = tl.program_id(0).to(tl.int64)
    start = logits + row * row_stride
    chunk_index = tl.arange(0, CHUNK_TILE)
    present = chunk_index < chunks
    maxima = tl.load(chunk_max + row * chunks + chunk_index, mask=present, other=float("-inf"))
    peak = tl.max(maxima, axis=0)
    weights = tl.where(maxima == float("-inf"), 0.0,
                       tl.load(chunk_sum + row * chunks + chunk_index, mask=present, other=0.0)
                       * tl.exp(maxima - peak))
    total = tl.sum(weights, axis=0)
    target = tl.load(uniforms + row).to(tl.float32) * total
    through = tl.cumsum(weights, axis=0)
    crossed = (through > target) & (weights > 0)
    # should rounding leave u x sum above every cumulative sum, the last chunk of non-zero probability
    chunk = tl.min(tl.where(crossed, chunk_index, CHUNK_TILE), axis=0)
    chunk = tl.where(chunk == CHUNK_TILE, tl.max(tl.where(weights > 0, chunk_index, 0), axis=0), chunk)
    walked = tl.sum(tl.where(chunk_index < chunk, weights, 0.0), axis=0)
    chosen = -1
    last_possible = 0
    for block in range(CHUNK_BLOCKS):
        cols = (chunk * CHUNK_BLOCKS + block) * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(start + cols, mask=cols < columns, other=float("-inf")).to(tl.float32) * inverse_temperature
        e = tl.exp(x - peak)
        crossed_here = (walked + tl.cumsum(e, axis=0) > target) & (e > 0)
        first = tl.min(tl.where(crossed_here, cols, columns), axis=0)
        chosen = tl.where((chosen < 0) & (first < columns), first, chosen)
        last_possible = tl.maximum(last_possible, tl.max(tl.where(e > 0, cols, 0), axis=0))
        walked += tl.sum(e, axis=0)
    chosen = tl.where(chosen < 0, last_possible, chosen)
    picked = tl.load(start + chosen).to(tl.float32) * inverse_temperature
    tl.store(tokens + row, chosen.to(tl.int64))
    tl.store(logprobs + row, picked - peak - tl.log(total))


def draw_with_logprobs(logits: torch.Tensor, temperature: float, uniforms: torch.Tensor
                       ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(tokens [rows] long, log softmax(logits / T)[token] [rows] fp32) for logits [rows, vocab] (rows
    contiguous in the last dimension) and one uniform in [0, 1) per row; temperature > 0."""
    rows, columns = logits.shape
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    chunks = triton.cdiv(columns, BLOCK_COLUMNS * CHUNK_BLOCKS)
    chunk_max = torch.empty(rows, chunks, dtype=torch.float32, device=logits.device)
    chunk_sum = torch.empty(rows, chunks, dtype=torch.float32, device=logits.device)
    _chunk_kernel[(rows, chunks)](logits, logits.stride(0), columns, 1.0 / temperature, chunk_max, chunk_sum,
                                  chunks, BLOCK=BLOCK_COLUMNS, CHUNK_BLOCKS=CHUNK_BLOCKS, num_warps=NUM_WARPS)
    tokens = torch.empty(rows, dtype=torch.long, device=logits.device)
    logprobs = torch.empty(rows, dtype=torch.float32, device=logits.device)
    _draw_kernel[(rows,)](logits, logits.stride(0), columns, 1.0 / temperature, uniforms, chunk_max, chunk_sum,
                          chunks, tokens, logprobs, BLOCK=BLOCK_COLUMNS, CHUNK_BLOCKS=CHUNK_BLOCKS,
                          CHUNK_TILE=max(2, triton.next_power_of_2(chunks)), num_warps=NUM_WARPS)
    return tokens, logprobs

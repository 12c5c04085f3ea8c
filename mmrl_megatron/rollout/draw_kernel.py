"""The decode step's draw and its log-prob in one Triton kernel, two passes over each row of logits.

sampling.py draws by inverse CDF: softmax, a float64 cumulative sum over the whole vocabulary, a search,
and then log_softmax again for the token's log-prob; on an H200 about 1 ms of an 8.9 ms decode step at
batch 256 over 151,936 columns (RESULTS.md 2026-12-02), several full-width fp32/float64 tensors written and
read. Here a row is read twice in its own dtype: once for its maximum and sum of e^(x/T - max) (online,
lane by lane), once to walk the cumulative sum block by block up to u x sum, the same uniform u the eager
path would use. Nothing of full width is written. This covers plain temperature sampling (no top-k/top-p
filtering, RL's usual setting); filtered and greedy draws keep sampling.py.

The sums are fp32 in another order than the eager path's float64, so a uniform within about 1e-6 (relative)
of a CDF step can select the neighbouring token; the distribution is the same. Should rounding leave u x sum
above the walked total, the last token of non-zero probability is taken, as the eager path's clamp does.
Written here because torch has no fused inverse-CDF draw and the serving engines' samplers (FlashInfer's)
are not among this project's dependencies. The kernel runs on CUDA tensors, and under TRITON_INTERPRET=1
on CPU tensors (the tests).
"""
from typing import Tuple

import torch
import triton
import triton.language as tl

BLOCK_COLUMNS = 4096
NUM_WARPS = 16


@triton.jit
def _draw_kernel(logits, row_stride, columns, inverse_temperature, uniforms, tokens, logprobs,
                 BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    start = logits + row * row_stride
    lane_max = tl.full([BLOCK], float("-inf"), tl.float32)
    lane_sum = tl.zeros([BLOCK], tl.float32)
    for offset in range(0, columns, BLOCK):
        cols = offset + tl.arange(0, BLOCK)
        x = tl.load(start + cols, mask=cols < columns, other=float("-inf")).to(tl.float32) * inverse_temperature
        new_max = tl.maximum(lane_max, x)
        safe = tl.where(new_max == float("-inf"), 0.0, new_max)
        lane_sum = lane_sum * tl.exp(lane_max - safe) + tl.exp(x - safe)
        lane_max = new_max
    peak = tl.max(lane_max, axis=0)
    total = tl.sum(tl.where(lane_max == float("-inf"), 0.0, lane_sum * tl.exp(lane_max - peak)), axis=0)
    target = tl.load(uniforms + row).to(tl.float32) * total
    walked = 0.0
    chosen = -1
    last_possible = 0
    for offset in range(0, columns, BLOCK):
        cols = offset + tl.arange(0, BLOCK)
        x = tl.load(start + cols, mask=cols < columns, other=float("-inf")).to(tl.float32) * inverse_temperature
        e = tl.exp(x - peak)
        crossed = (walked + tl.cumsum(e, axis=0) > target) & (e > 0)
        first = tl.min(tl.where(crossed, cols, columns), axis=0)
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
    tokens = torch.empty(rows, dtype=torch.long, device=logits.device)
    logprobs = torch.empty(rows, dtype=torch.float32, device=logits.device)
    _draw_kernel[(rows,)](logits, logits.stride(0), columns, 1.0 / temperature, uniforms, tokens, logprobs,
                          BLOCK=BLOCK_COLUMNS, num_warps=NUM_WARPS)
    return tokens, logprobs

"""Per-token log-probabilities and entropy in two Triton passes over the logits, one pass back.

The eager path (logprobs.py) runs log-probs and entropy as separate chains of full-width fp32 passes over
[tokens, V/TP] (casts, max, subtract, exp, sums, and their backward): on an H200 about 85 ms of a 0.77 s
update step for 3B-model micro-batches of 3,072 response positions over 151,936 columns. Here each row of
the logits, in their own dtype, is read twice forward (its maximum; then sum e^(x-m), sum e^(x-m)(x-m) and
the label's logit, m the maximum over the whole vocabulary) and once backward (reading the logits, writing
their gradient), and nothing of full width is ever fp32: 2.6 ms forward and 2.9 ms backward for 16,384 x
151,936 bf16 logits where the eager path took 89 and 37 ms (bench_logprob.py, RESULTS.md 2026-12-02). Written
here because no library kernel gives log-probs and entropy with their gradients over a vocabulary split
over tensor-parallel ranks (liger-kernel's fused cross-entropy has no entropy and no sharded vocabulary).

With m, S0 = sum e^(x-m) and S1 = sum e^(x-m)(x-m) over the whole vocabulary (sums all-reduced over the
shards): log Z = m + log S0, log p(label) = x_label - log Z, H = log S0 - S1/S0, and
dL/dx_v = g_lp (1[v = label] - p_v) - g_H p_v ((x_v - m) - S1/S0).
Padding columns at -inf contribute nothing (p = 0 there, and the products are taken as 0).
The kernels run on CUDA tensors; under TRITON_INTERPRET=1 on CPU tensors too (the tests).
"""
from typing import Optional, Tuple

import torch
import torch.distributed as dist
import triton
import triton.language as tl

from .logprobs import _all_reduce, _vocab_offset

BLOCK_COLUMNS = 4096  # columns per step of a row's loop: 8 KB of bf16 per load, 16 warps
NUM_WARPS = 16


@triton.jit
def _row_max_kernel(logits, row_stride, columns, peak, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    start = logits + row * row_stride
    running = tl.full([BLOCK], float("-inf"), tl.float32)
    for offset in range(0, columns, BLOCK):
        cols = offset + tl.arange(0, BLOCK)
        x = tl.load(start + cols, mask=cols < columns, other=float("-inf")).to(tl.float32)
        running = tl.maximum(running, x)
    tl.store(peak + row, tl.max(running, axis=0))


@triton.jit
def _row_sums_kernel(logits, row_stride, columns, peak, labels, sums, rows, BLOCK: tl.constexpr):
    """sums[0, row] = S0, sums[1, row] = S1, sums[2, row] = the label's logit (0 where another shard owns it)."""
    row = tl.program_id(0).to(tl.int64)
    start = logits + row * row_stride
    m = tl.load(peak + row)
    total = tl.zeros([BLOCK], tl.float32)
    weighted = tl.zeros([BLOCK], tl.float32)
    for offset in range(0, columns, BLOCK):
        cols = offset + tl.arange(0, BLOCK)
        shifted = tl.load(start + cols, mask=cols < columns, other=float("-inf")).to(tl.float32) - m
        e = tl.exp(shifted)
        total += e
        weighted += tl.where(e > 0, e * shifted, 0.0)
    label = tl.load(labels + row)
    picked = tl.load(start + tl.maximum(label, 0), mask=label >= 0, other=0.0).to(tl.float32)
    tl.store(sums + row, tl.sum(total, axis=0))
    tl.store(sums + rows + row, tl.sum(weighted, axis=0))
    tl.store(sums + 2 * rows + row, picked)


@triton.jit
def _row_grad_kernel(logits, row_stride, columns, grad, grad_row_stride, peak, log_normaliser, mean_shift, labels,
                     grad_logprobs, grad_entropy, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    start = logits + row * row_stride
    out = grad + row * grad_row_stride
    m = tl.load(peak + row)
    log_z = tl.load(log_normaliser + row)
    mean = tl.load(mean_shift + row)
    label = tl.load(labels + row)
    g_lp = tl.load(grad_logprobs + row)
    g_h = tl.load(grad_entropy + row)
    for offset in range(0, columns, BLOCK):
        cols = offset + tl.arange(0, BLOCK)
        inside = cols < columns
        x = tl.load(start + cols, mask=inside, other=float("-inf")).to(tl.float32)
        p = tl.exp(x - log_z)
        centred = tl.where(p > 0, p * ((x - m) - mean), 0.0)
        value = -g_lp * p - g_h * centred + tl.where(cols == label, g_lp, 0.0)
        tl.store(out + cols, value.to(out.dtype.element_ty), mask=inside)


def _rows(logits: torch.Tensor) -> torch.Tensor:
    """logits as [rows, V/TP] with unit column stride (a view where the layout allows)."""
    flat = logits.reshape(-1, logits.shape[-1])
    return flat if flat.stride(-1) == 1 else flat.contiguous()


class _FusedLogprobsEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, group):
        flat = _rows(logits)
        rows, columns = flat.shape
        local = labels.reshape(-1) - _vocab_offset(columns, group)
        local = torch.where((local >= 0) & (local < columns), local, -1)  # -1: another shard owns the label
        peak = torch.empty(rows, dtype=torch.float32, device=flat.device)
        _row_max_kernel[(rows,)](flat, flat.stride(0), columns, peak, BLOCK=BLOCK_COLUMNS, num_warps=NUM_WARPS)
        _all_reduce(peak, dist.ReduceOp.MAX, group)
        sums = torch.empty(3, rows, dtype=torch.float32, device=flat.device)
        _row_sums_kernel[(rows,)](flat, flat.stride(0), columns, peak, local, sums, rows, BLOCK=BLOCK_COLUMNS,
                                  num_warps=NUM_WARPS)
        total, weighted, target = _all_reduce(sums, dist.ReduceOp.SUM, group)
        log_total = torch.log(total)
        mean_shift = weighted / total
        log_normaliser = peak + log_total
        ctx.save_for_backward(flat, local, peak, log_normaliser, mean_shift)
        ctx.logits_shape = logits.shape
        logprobs = (target - log_normaliser).view(labels.shape)
        entropy = (log_total - mean_shift).view(logits.shape[:-1])
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        flat, local, peak, log_normaliser, mean_shift = ctx.saved_tensors
        rows, columns = flat.shape
        zeros = torch.zeros(rows, dtype=torch.float32, device=flat.device)
        grad_logprobs = zeros if grad_logprobs is None else grad_logprobs.reshape(-1).float().contiguous()
        grad_entropy = zeros if grad_entropy is None else grad_entropy.reshape(-1).float().contiguous()
        grad = torch.empty_like(flat)
        _row_grad_kernel[(rows,)](flat, flat.stride(0), columns, grad, grad.stride(0), peak, log_normaliser,
                                  mean_shift, local, grad_logprobs, grad_entropy, BLOCK=BLOCK_COLUMNS,
                                  num_warps=NUM_WARPS)
        return grad.view(ctx.logits_shape), None, None


def fused_logprobs_and_entropy(logits_shard: torch.Tensor, labels: torch.Tensor,
                               group: Optional[object] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(log p(labels) [...], entropy [...]), both fp32, from logits [..., V/TP] sharded over `group` (None:
    the whole vocabulary); differentiable in both."""
    return _FusedLogprobsEntropy.apply(logits_shard, labels.long(), group)

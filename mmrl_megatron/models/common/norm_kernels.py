"""The RMSNorm's backward in one Triton kernel: the input's gradient and the weight's partial sums from one
read of the input and the output's gradient.

torch's CUDA backward of F.rms_norm reads both twice, once for the input's gradient and once more for the
weight's (on an H200, 4,096 x 2,048 in bf16: 37.5 us + 19.9 us per call in a profiled 3B update step, 17 ms of
it). Here each program walks a block of rows, writes their input gradients and keeps its share of the
weight gradient in registers; one small sum over the programs finishes it (at 4,096 x 2,048 the kernel 19.7 us,
the sum 10.6). The forward stays torch's fused kernel. Forward + backward on the same GPU: 61 -> 56 us at
4,096 x 2,048, 212 -> 174 us at 16,384 x 2,048, 98 -> 86 us at 4,096 x 3,584, 233 -> 188 us at 4,096 x 8,192.
Computes in fp32 and rounds once, as torch's kernels do. Runs on CUDA tensors, and under TRITON_INTERPRET=1 on
CPU tensors (the tests).
"""
from typing import Tuple

import torch
import triton
import triton.language as tl

# Programs per multiprocessor: enough rows in flight to hide the loads' latency, few enough that the weight's
# partial sums (programs x columns in fp32) stay small. Forward + backward on an H200, bf16, 1 / 2 / 4 / 8 per
# SM (torch's): 4,096 x 2,048 79.2 / 61.8 / 55.6 / 54.3 us (60.9); 16,384 x 2,048 282 / 208 / 174 / 170 (212);
# 4,096 x 3,584 107 / 86.4 / 97.2 / 93.7 (97.6); 4,096 x 8,192 188 / 195 / 208 / 210 (233).
PARTIAL_COLUMNS_PER_SM = 8192


@triton.jit
def _rms_norm_backward_kernel(x, grad, weight, grad_x, weight_partials, rows, columns, x_stride, grad_stride,
                              rows_per_program, epsilon, BLOCK: tl.constexpr):
    """Program p: rows [p * rows_per_program, ...) of dx = r * (w * g) - x * r^3 * mean(x * w * g), with
    r = 1 / sqrt(mean(x^2) + eps), and its partial sum of g * x * r for the weight."""
    program = tl.program_id(0)
    cells = tl.arange(0, BLOCK)
    inside = cells < columns
    w = tl.load(weight + cells, mask=inside, other=0.0).to(tl.float32)
    weight_sum = tl.zeros([BLOCK], dtype=tl.float32)
    for step in range(rows_per_program):
        row = (program * rows_per_program + step).to(tl.int64)
        mask = tl.where(row < rows, inside, False)
        values = tl.load(x + row * x_stride + cells, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(grad + row * grad_stride + cells, mask=mask, other=0.0).to(tl.float32)
        inverse_rms = 1.0 / tl.sqrt(tl.sum(values * values, axis=0) / columns + epsilon)
        weighted = w * g
        mean_product = tl.sum(weighted * values, axis=0) / columns
        dx = inverse_rms * weighted - values * (inverse_rms * inverse_rms * inverse_rms * mean_product)
        tl.store(grad_x + row * columns + cells, dx.to(grad_x.dtype.element_ty), mask=mask)
        weight_sum += g * values * inverse_rms
    tl.store(weight_partials + program * columns + cells, weight_sum, mask=inside)


def _programs(rows: int, columns: int, device: torch.device) -> int:
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    return max(1, min(rows, max(1, PARTIAL_COLUMNS_PER_SM // columns) * sms))


def rms_norm_backward(x: torch.Tensor, grad: torch.Tensor, weight: torch.Tensor,
                      epsilon: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """(dx like x, dweight like weight) of y = x / rms(x) * weight over the last dimension, for the output's
    gradient `grad`."""
    columns = x.shape[-1]
    x_rows, grad_rows = (t.reshape(-1, columns) for t in (x, grad))
    x_rows, grad_rows = (t if t.stride(-1) == 1 else t.contiguous() for t in (x_rows, grad_rows))
    rows = x_rows.shape[0]
    grad_x = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    programs = _programs(rows, columns, x.device)
    partials = torch.empty(programs, columns, dtype=torch.float32, device=x.device)
    block = triton.next_power_of_2(columns)
    _rms_norm_backward_kernel[(programs,)](
        x_rows, grad_rows, weight, grad_x, partials, rows, columns, x_rows.stride(0), grad_rows.stride(0),
        triton.cdiv(rows, programs), epsilon, BLOCK=block, num_warps=8 if block >= 4096 else 4)
    return grad_x, partials.sum(0).to(weight.dtype)

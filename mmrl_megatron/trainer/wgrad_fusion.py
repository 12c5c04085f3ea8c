"""Weight gradients accumulated into megatron-core's fp32 main_grad inside the GEMM, on GPUs without apex.

megatron-core's DDP keeps an fp32 gradient buffer (`param.main_grad`) per parameter. Without apex's
`fused_weight_gradient_mlp_cuda` extension every linear layer's backward computes its weight gradient in
bf16 into `param.grad`, and DDP's hook then adds it to main_grad: one more weight-sized bf16 tensor written
and read, plus a read-modify-write of the fp32 buffer, per layer and micro-batch (53 ms of a 0.84 s step of
the 3B update on an H200). With a layer's `gradient_accumulation_fusion` set, megatron-core instead calls
the extension's `wgrad_gemm_accum_fp32(input, grad_output, main_grad)`; cuBLAS does the same in one GEMM
(bf16 inputs, fp32 accumulator and output, beta 1), which torch exposes as addmm with `out_dtype`.

The fusion is switched on per layer after DDP has given the weights their main_grad (the config flag
would switch it on for every layer, and a layer whose weight has no main_grad, such as a model trained
without DDP, fails in megatron-core's backward). A layer that borrows its weight (the output layer of a
tied embedding) stays unfused: the embedding's own gradient reaches the same parameter through autograd,
and megatron-core's DDP hook drops `param.grad` once a fused layer has marked the parameter.
"""
from types import SimpleNamespace
from typing import Iterable, List

import torch


def _accumulate_into_fp32(input: torch.Tensor, grad_output: torch.Tensor, main_grad: torch.Tensor) -> None:
    """main_grad [out, in] fp32 += grad_output [n, out]^T @ input [n, in], both bf16/fp16."""
    torch.addmm(main_grad, grad_output.t(), input, out_dtype=torch.float32, out=main_grad)


def _install_kernels() -> bool:
    """Whether megatron-core's linear layers have a kernel to call: apex's extension, or, where apex is absent,
    ours under its name in the module they read it from (the fp32 entry only, as trainer/optim.py's DDP always
    keeps fp32 gradient buffers), given torch's mixed-dtype addmm (newer than the oldest torch setup.py allows)."""
    from megatron.core.tensor_parallel import layers

    if getattr(layers, "fused_weight_gradient_mlp_cuda", None) is not None:
        return True
    if "dtype_out" not in torch.ops.aten.addmm.overloads():
        return False
    layers.fused_weight_gradient_mlp_cuda = SimpleNamespace(wgrad_gemm_accum_fp32=_accumulate_into_fp32)
    return True


def fusable_layers(chunks: Iterable[torch.nn.Module]) -> List[torch.nn.Module]:
    """The megatron-core linear layers in `chunks` that own a trainable weight with a DDP main_grad."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    return [module for chunk in chunks for module in chunk.modules()
            if isinstance(module, (ColumnParallelLinear, RowParallelLinear)) and module.weight is not None
            and module.weight.requires_grad and hasattr(module.weight, "main_grad")]


def fuse_weight_gradient_accumulation(chunks: Iterable[torch.nn.Module]) -> int:
    """Fuse the weight-gradient accumulation of the fusable layers whose weights are on a GPU (the CPU has
    no mixed-dtype GEMM); returns how many layers were fused (0 where no kernel is available)."""
    layers = [module for module in fusable_layers(chunks) if module.weight.is_cuda]
    if not layers or not _install_kernels():
        return 0
    for module in layers:
        module.gradient_accumulation_fusion = True
    return len(layers)

"""RMSNorm for the local (non-Transformer-Engine) layer specs.

megatron-core's WrappedTorchNorm builds torch.nn.RMSNorm with an fp32 weight whatever the model's dtype;
torch's fused kernel needs input and weight of one dtype, so a bf16 model ran the unfused chain (on an
H200, 1.67 ms against 0.30 ms for 16,384 x 2,048). This norm keeps its weight in params_dtype, as the
published checkpoints store it, and also runs under sequence parallelism (its weight is marked for the
sequence-parallel gradient all-reduce), which WrappedTorchNorm refuses. On a GPU its backward is one Triton
kernel (norm_kernels.py); the CPU keeps torch's, the exact path the parity tests compare.
"""
import torch
import torch.nn.functional as F


class _FusedBackwardRMSNorm(torch.autograd.Function):
    """torch's fused rms_norm forward; the backward from norm_kernels.rms_norm_backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, epsilon: float) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.epsilon = epsilon
        return F.rms_norm(x, (x.shape[-1],), weight, epsilon)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        from .norm_kernels import rms_norm_backward  # Triton: present wherever CUDA tensors are

        x, weight = ctx.saved_tensors
        grad_x, grad_weight = rms_norm_backward(x, grad, weight, ctx.epsilon)
        return grad_x, grad_weight, None


class RMSNorm(torch.nn.Module):
    """megatron norm-module contract (config, hidden_size, eps)."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **unused):
        super().__init__()
        self.eps = eps
        # where megatron's own modules put their weights: with use_cpu_initialization the default device (the
        # CPU, or meta while a streamed conversion builds the model), else the GPU
        device = None if config.use_cpu_initialization else torch.cuda.current_device()
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype, device=device))
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)

    def forward(self, x):
        if x.is_cuda and torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return _FusedBackwardRMSNorm.apply(x, self.weight, self.eps)
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)

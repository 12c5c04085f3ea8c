"""megatron-core's optimizer and LR/WD scheduler for one trainable role, and the clipped step.

On CPU megatron-core's DistributedOptimizer refuses non-CUDA parameters (a type check in
_build_model_and_main_param_groups), so CPU runs use megatron-core's plain (replicated-state) optimizer;
GPU runs use the distributed optimizer when optimizer.use_distributed_optimizer is set. Gradient clipping
is done here rather than in optimizer.step() because megatron's clip_grad_by_total_norm_fp32 asserts
CUDA tensors; the arithmetic is the same (scale every main grad by max_norm / total_norm).
"""
import math
from typing import List, Tuple

import torch

from ..config.schema import OptimizerConfig
from .wgrad_fusion import fuse_weight_gradient_accumulation

DECAY_STYLE = {"constant": "constant", "linear": "linear", "cosine": "cosine"}


def wrap_for_data_parallel(model_chunks: List[torch.nn.Module], transformer_config, use_distributed_optimizer: bool):
    """megatron-core DDP around each chunk: contiguous fp32 grad buffers reduced across data-parallel ranks,
    into which the linear layers' weight-gradient GEMMs accumulate directly on a GPU (wgrad_fusion.py)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                               use_distributed_optimizer=use_distributed_optimizer)
    transformer_config.finalize_model_grads_func = finalize_model_grads
    chunks = [DistributedDataParallel(transformer_config, ddp_config, chunk) for chunk in model_chunks]
    fuse_weight_gradient_accumulation(chunks)
    return chunks


def distributed_optimizer_allowed(config: OptimizerConfig, device: torch.device) -> bool:
    return config.use_distributed_optimizer and device.type == "cuda"


def _use_fused_adam(optimizer) -> None:
    """Without TE or apex megatron-core steps with torch's AdamW, which defaults to its multi-tensor
    (foreach) kernels: several passes over every state tensor. On CUDA the fused kernel does the update
    in one pass; it reads the flag from each parameter group at step time."""
    for part in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(part, "optimizer", None)
        if not isinstance(inner, torch.optim.AdamW):
            continue
        for group in inner.param_groups:
            if all(p.is_cuda and p.dtype == torch.float32 for p in group["params"]):
                group.update(fused=True, foreach=False)


def _l2_norm_on_device(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """apex's multi_tensor_l2norm contract: (the norm of all tensors as a [1] tensor, None)."""
    norms = torch._foreach_norm(tensor_lists[0])
    return torch.linalg.vector_norm(torch.stack(norms)).reshape(1).float(), None


def _grad_norm_with_one_read() -> None:
    """Without TE or apex megatron-core's gradient norm falls back to a local multi-tensor L2 norm that turns
    every tensor's norm into a Python float: one host synchronisation per parameter tensor (584 in the 3B
    model's optimizer step on an H200). This one keeps the norms on the device; the caller reads the total."""
    from megatron.core.optimizer import clip_grads
    from megatron.core.utils import local_multi_tensor_l2_norm

    if clip_grads.l2_norm_impl is local_multi_tensor_l2_norm:
        clip_grads.l2_norm_impl = _l2_norm_on_device


def build_optimizer(model_chunks, config: OptimizerConfig, total_steps: int, bf16: bool, device: torch.device):
    """(megatron optimizer, OptimizerParamScheduler) for DDP-wrapped chunks; the schedule counts optimizer steps."""
    from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig
    from megatron.core.optimizer import get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    megatron_config = MegatronOptimizerConfig(
        optimizer="adam", lr=config.lr, min_lr=config.min_lr, weight_decay=config.weight_decay,
        adam_beta1=config.adam_beta1, adam_beta2=config.adam_beta2, clip_grad=0.0, bf16=bf16,
        use_distributed_optimizer=distributed_optimizer_allowed(config, device),
    )
    optimizer = get_megatron_optimizer(megatron_config, model_chunks)
    _use_fused_adam(optimizer)
    _grad_norm_with_one_read()
    warmup = min(config.warmup_steps, max(total_steps - 1, 0))
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0 if warmup else config.lr, max_lr=config.lr, min_lr=config.min_lr,
        lr_warmup_steps=warmup, lr_decay_steps=max(total_steps, warmup + 1), lr_decay_style=DECAY_STYLE[config.lr_schedule],
        start_wd=config.weight_decay, end_wd=config.weight_decay, wd_incr_steps=max(total_steps, 1),
        wd_incr_style="constant",
    )
    return optimizer, scheduler


def _stepped_parameters(optimizer) -> List[torch.nn.Parameter]:
    """Every parameter a megatron optimizer steps; MoE models get a ChainedOptimizer (dense + experts)."""
    return [p for part in getattr(optimizer, "chained_optimizers", [optimizer]) for p in part.get_parameters()]


def clipped_step(optimizer, scheduler, max_norm: float) -> Tuple[bool, float]:
    """Reduce grads into main params, clip by the global norm, step, advance the schedule (when given).

    Returns (stepped, grad_norm); a non-finite grad norm skips the step (the caller counts it)."""
    if optimizer.prepare_grads():  # found inf in (scaled) grads
        return False, float("inf")
    grad_norm = float(optimizer.get_grad_norm())
    if not math.isfinite(grad_norm):
        return False, grad_norm
    if max_norm > 0 and grad_norm > max_norm:
        grads = [p.grad for p in _stepped_parameters(optimizer) if p.grad is not None]
        torch._foreach_mul_(grads, max_norm / (grad_norm + 1e-6))
    stepped = bool(optimizer.step_with_ready_grads())
    if stepped and scheduler is not None:
        scheduler.step(1)
    return stepped, grad_norm


def current_lr(optimizer) -> float:
    return float(optimizer.param_groups[0]["lr"])

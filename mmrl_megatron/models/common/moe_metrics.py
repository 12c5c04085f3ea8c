"""Routing metrics of the MoE layers for the step's metrics: how evenly tokens reached the experts.

megatron-core's routers count routed tokens per expert (`local_tokens_per_expert`) while gradients are
enabled, for the expert-bias update, and finalize_model_grads zeroes the counts; so read them after the
step's backward passes and before finalize_model_grads. The layers are dropless (no capacity factor),
so no token is ever dropped; the metric says so rather than leaving it out.
"""
from typing import Dict, List

import torch
import torch.distributed as dist


def _router_counts(model_chunks) -> List[torch.Tensor]:
    counts = []
    for chunk in model_chunks if isinstance(model_chunks, (list, tuple)) else [model_chunks]:
        for module in chunk.modules():
            tokens = getattr(module, "local_tokens_per_expert", None)
            if tokens is not None and hasattr(module, "expert_bias"):
                counts.append(tokens.detach().clone().float())
    return counts


def moe_routing_metrics(model_chunks, dims) -> Dict[str, float]:
    """Collective over all ranks of the parallel.ParallelDims `dims`. Load ratio of a layer = tokens of its
    busiest expert / mean tokens per expert (1.0 is perfect balance). Returns the worst layer's ratio, the mean
    over layers, the dropped-token fraction (0: dropless routing) and the number of MoE layers counted."""
    counts = _router_counts(model_chunks)
    ratios = torch.zeros(2)  # (sum of ratios, layers) on this stage
    worst = torch.zeros(1)
    if counts:
        stacked = torch.stack(counts)
        dist.all_reduce(stacked, group=dims.tensor_and_data_parallel_group)
        per_layer = stacked.max(dim=-1).values / stacked.mean(dim=-1).clamp_min(1e-9)
        ratios = torch.tensor([per_layer.sum().item(), float(len(counts))])
        worst = per_layer.max().reshape(1).cpu()
    pipeline = dims.pipeline_group
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    ratios, worst = ratios.to(device), worst.to(device)
    if dist.get_world_size(pipeline) > 1:
        dist.all_reduce(ratios, group=pipeline)
        dist.all_reduce(worst, op=dist.ReduceOp.MAX, group=pipeline)
    layers = int(ratios[1].item())
    return {"moe/max_load_ratio": worst.item(), "moe/mean_load_ratio": ratios[0].item() / max(layers, 1),
            "moe/dropped_token_fraction": 0.0, "moe/layers": float(layers)}

"""Training behaviour of the Kimi-VL model on one CPU rank: a forward/backward with an image reaches every
trainable part, the router's expert bias stays fixed unless model.moe_router_bias_update_rate > 0, and the
routing metrics describe the step."""
import torch

from mmrl_megatron.models.kimi_vl.tiny import MEDIA_PLACEHOLDER_TOKEN_ID as MEDIA
from tests.cpu_ranks import run_on_cpu_ranks

RATES = (0.0, 0.01)
SEQUENCES = [[5, 17, MEDIA, MEDIA, MEDIA, MEDIA, 99, 3], [7, 120, 64, 33, 11, 90]]


def _train_step(rate):
    """Build from config.json contents through the models-interface builder, run one training
    forward/backward, then megatron's expert-bias update; returns what the test checks."""
    from megatron.core.distributed.finalize_model_grads import _update_router_expert_bias
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from mmrl_megatron.config.schema import ModelConfig
    from mmrl_megatron.models import build_model
    from mmrl_megatron.models.common.moe_metrics import moe_routing_metrics
    from mmrl_megatron.models.kimi_vl.tiny import tiny_config_dict
    from mmrl_megatron.parallel import ParallelDims, start_processes

    dims = start_processes(ParallelDims(world_size=1), torch.device("cpu"))
    model_parallel_cuda_manual_seed(0)
    torch.manual_seed(0)
    model = build_model(ModelConfig(dtype="float32", moe_router_bias_update_rate=rate), tiny_config_dict(),
                        dims, "actor")
    model.train()
    ids = torch.tensor([token for sequence in SEQUENCES for token in sequence]).unsqueeze(0)
    bounds = torch.tensor([0, len(SEQUENCES[0]), ids.shape[1]], dtype=torch.int32)
    packed = PackedSeqParams(qkv_format="thd", cu_seqlens_q=bounds, cu_seqlens_kv=bounds, max_seqlen_q=8,
                             max_seqlen_kv=8)
    pixels = torch.randn(16, 3, 14, 14, generator=torch.Generator().manual_seed(1))
    logits = model(ids, packed_seq_params=packed, pixel_values=pixels, image_grid_thw=torch.tensor([[1, 4, 4]]))
    torch.log_softmax(logits.float(), dim=-1)[0, :-1].gather(-1, ids[0, 1:, None]).mean().backward()
    no_grad = [name for name, param in model.named_parameters() if param.requires_grad
               and (param.grad is None or not torch.isfinite(param.grad).all() or not param.grad.abs().sum() > 0)]
    metrics = moe_routing_metrics([model], dims)
    biases = [module.expert_bias for module in model.modules() if getattr(module, "expert_bias", None) is not None]
    before = [bias.clone() for bias in biases]
    _update_router_expert_bias([model], model.config)
    return no_grad, metrics, [(after - first) for after, first in zip(biases, before)]


def _both_rates():
    return [_train_step(rate) for rate in RATES]


def test_training_step_gradients_bias_and_routing_metrics():
    """Invariants: every trainable parameter (MLA, router, routed and shared experts, vision tower,
    projector) gets a finite non-zero gradient from a prompt with an image; megatron's expert-bias
    update leaves the bias exactly as it was at rate 0 and moves it by exactly the rate (per expert, towards balance) otherwise;
    routing metrics count every MoE layer, report a load ratio >= 1 and no dropped tokens."""
    [results] = run_on_cpu_ranks(1, _both_rates)
    (fixed_no_grad, metrics, fixed_moves), (_, _, moved) = results
    assert fixed_no_grad == []
    assert all(torch.equal(move, torch.zeros_like(move)) for move in fixed_moves) and fixed_moves
    steps = torch.cat(moved).abs()  # sign(mean load - load) * rate: 0 only for an expert at exactly the mean
    assert torch.allclose(steps[steps > 0], torch.full_like(steps[steps > 0], RATES[1])) and (steps > 0).any()
    assert metrics["moe/layers"] == 3.0  # 4 layers, the first dense
    assert metrics["moe/max_load_ratio"] >= metrics["moe/mean_load_ratio"] >= 1.0
    assert metrics["moe/dropped_token_fraction"] == 0.0

"""A tiny megatron-core GPT at TP=2 x PP=2 on 4 CPU ranks computes the same loss as on 1 rank."""
import re
import zlib

import torch

from tests.cpu_ranks import run_on_cpu_ranks

NUM_LAYERS, HIDDEN, HEADS, VOCAB, SEQ, MICRO_BATCHES = 4, 32, 4, 64, 16, 4


def _global_value(name: str, full_shape) -> torch.Tensor:
    generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    base = 1.0 if name.endswith("layer_norm_weight") or name.endswith("layernorm.weight") else 0.0
    return base + 0.05 * torch.randn(full_shape, generator=generator)


def _fill_from_global(model, tp_rank: int, tp_size: int, layer_offset: int) -> None:
    """Give every local shard the slice of one global, name-seeded tensor, so layouts agree."""
    for name, param in model.named_parameters():
        global_name = re.sub(r"layers\.(\d+)\.", lambda m: f"layers.{int(m.group(1)) + layer_offset}.", name)
        full_shape = list(param.shape)
        if getattr(param, "tensor_model_parallel", False):
            full_shape[param.partition_dim] *= tp_size
        full = _global_value(global_name, full_shape)
        if getattr(param, "tensor_model_parallel", False):
            full = full.chunk(tp_size, dim=param.partition_dim)[tp_rank]
        with torch.no_grad():
            param.copy_(full)


def _loss_on_layout(tp: int, pp: int) -> float:
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.core.transformer import TransformerConfig

    import torch.distributed as dist

    from mmrl_megatron.parallel import ParallelDims, start_processes

    start_processes(ParallelDims(dist.get_world_size(), tensor=tp, pipeline=pp), torch.device("cpu"))
    model_parallel_cuda_manual_seed(1)
    config = TransformerConfig(
        num_layers=NUM_LAYERS, hidden_size=HIDDEN, num_attention_heads=HEADS, num_query_groups=2,
        ffn_hidden_size=64, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        pipeline_dtype=torch.float32, use_cpu_initialization=True, hidden_dropout=0.0, attention_dropout=0.0,
        bias_activation_fusion=False, bias_dropout_fusion=False, masked_softmax_fusion=False,
        persist_layer_norm=False, apply_rope_fusion=False, gradient_accumulation_fusion=False,
    )
    model = GPTModel(
        config=config, transformer_layer_spec=get_gpt_layer_local_spec(), vocab_size=VOCAB,
        max_sequence_length=SEQ, pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(), share_embeddings_and_output_weights=False,
    )
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    _fill_from_global(model, parallel_state.get_tensor_model_parallel_rank(), tp, pp_rank * NUM_LAYERS // pp)

    tokens = torch.randint(0, VOCAB, (MICRO_BATCHES, 1, SEQ + 1), generator=torch.Generator().manual_seed(7))
    batches = iter([(t[:, :-1], t[:, 1:]) for t in tokens])

    def forward_step(data_iterator, model):
        inputs, labels = next(data_iterator)
        positions = torch.arange(SEQ).unsqueeze(0)
        output = model(inputs, positions, None, labels=labels)
        return output, lambda per_token: (per_token.mean(), {"loss": per_token.mean().detach()})

    losses = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=batches, model=[model], num_microbatches=MICRO_BATCHES,
        seq_length=SEQ, micro_batch_size=1, forward_only=False,
    )
    grads_finite = all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    if not parallel_state.is_pipeline_last_stage():
        return None, grads_finite
    return sum(item["loss"].item() for item in losses) / MICRO_BATCHES, grads_finite


def test_tp2_pp2_loss_matches_single_rank():
    """Invariant: the parallel layout changes how work is split, never the loss (1e-5 absolute)."""
    [(single_loss, single_finite)] = run_on_cpu_ranks(1, _loss_on_layout, 1, 1)
    results = run_on_cpu_ranks(4, _loss_on_layout, 2, 2)
    parallel_losses = [loss for loss, _ in results if loss is not None]
    assert single_finite and all(finite for _, finite in results)
    assert len(parallel_losses) == 2  # both TP ranks of the last pipeline stage
    for loss in parallel_losses:
        assert abs(loss - single_loss) < 1e-5, (loss, single_loss)

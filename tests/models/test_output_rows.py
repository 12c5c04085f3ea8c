"""Only the chosen stream positions reach the output layer, with the values and gradients of the full
projection at those positions, under tensor parallelism with and without sequence parallelism."""
import pytest
import torch

from tests.cpu_ranks import run_on_cpu_ranks

TOKENS = 16
ROWS = [3, 4, 5, 11, 12, 15]
TOLERANCE = 1e-6  # fp32, the same arithmetic on fewer rows


def _gpt(sequence_parallel: bool):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.core.transformer import TransformerConfig

    from mmrl_megatron.models.common.specs import decoder_spec

    config = TransformerConfig(
        num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=64,
        normalization="RMSNorm", tensor_model_parallel_size=2, sequence_parallel=sequence_parallel, use_cpu_initialization=True,
        hidden_dropout=0.0, attention_dropout=0.0, bias_activation_fusion=False, bias_dropout_fusion=False,
        masked_softmax_fusion=False, persist_layer_norm=False, apply_rope_fusion=False,
        gradient_accumulation_fusion=False)
    torch.manual_seed(0)
    model_parallel_cuda_manual_seed(0)
    return GPTModel(config=config, transformer_layer_spec=decoder_spec("sdpa", config), vocab_size=64,
                    max_sequence_length=64, position_embedding_type="rope")


def _full_and_selected(sequence_parallel: bool):
    from mmrl_megatron.models.common.output_rows import OutputRows
    import torch.distributed as dist

    from mmrl_megatron.parallel import ParallelDims, start_processes

    start_processes(ParallelDims(dist.get_world_size(), tensor=2), torch.device("cpu"))
    model = _gpt(sequence_parallel)
    output_rows = OutputRows(model)
    tokens = torch.randint(0, 64, (1, TOKENS), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(TOKENS)[None]
    rows = torch.tensor(ROWS)
    weights = torch.randn(len(ROWS), 32, generator=torch.Generator().manual_seed(2))  # this rank's vocab shard

    def run(selected: bool):
        model.zero_grad()
        with output_rows.only(rows if selected else None):
            logits = model(tokens, positions, attention_mask=None)
        picked = logits[0] if selected else logits[0, rows]
        (picked * weights).sum().backward()
        return picked.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}

    (full, full_grads), (selected, selected_grads) = run(False), run(True)
    return full, selected, full_grads, selected_grads, model.output_layer.sequence_parallel


@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_selected_rows_equal_the_full_projection(sequence_parallel):
    """Invariant: logits and every parameter gradient with output rows equal those of the full projection
    read at the same rows (TP=2, sequence parallel on and off), and the layer's own setting is restored."""
    for full, selected, full_grads, selected_grads, flag in run_on_cpu_ranks(2, _full_and_selected,
                                                                            sequence_parallel):
        assert selected.shape == (len(ROWS), 32)
        assert torch.allclose(selected, full, atol=TOLERANCE, rtol=0)
        for name, grad in full_grads.items():
            assert torch.allclose(selected_grads[name], grad, atol=TOLERANCE, rtol=0), name
        assert flag == sequence_parallel

"""The linear layers' weight gradients accumulate into DDP's fp32 main_grad inside the GEMM on a GPU
(trainer/wgrad_fusion.py): which layers take it, and that the gradients equal the unfused path's."""
import json
import os

import pytest
import torch

from tests.cpu_ranks import run_on_cpu_ranks
from tests.models.qwen_inputs import make_samples, packed


def _tiny_actor(hf_dir: str, dims, device: torch.device, dtype: str, freeze_vision_tower: bool = False):
    from mmrl_megatron.config.schema import ModelConfig
    from mmrl_megatron.convert import load_hf_into_model
    from mmrl_megatron.models import build_model, conversion_table

    with open(os.path.join(hf_dir, "config.json")) as handle:
        config = json.load(handle)
    model = build_model(ModelConfig(hf_path=hf_dir, dtype=dtype, freeze_vision_tower=freeze_vision_tower),
                        config, dims, "actor").to(device)
    load_hf_into_model(model, hf_dir, conversion_table(model), dims)
    return model, config


def _selection(hf_dir: str):
    from megatron.core.utils import get_model_config

    from mmrl_megatron.parallel import ParallelDims, start_processes
    from mmrl_megatron.trainer.optim import wrap_for_data_parallel
    from mmrl_megatron.trainer.wgrad_fusion import fusable_layers, fuse_weight_gradient_accumulation

    device = torch.device("cpu")
    dims = start_processes(ParallelDims(world_size=1), device)
    model, _ = _tiny_actor(hf_dir, dims, device, "float32", freeze_vision_tower=True)
    before_wrapping = len(fusable_layers([model]))
    chunks = wrap_for_data_parallel([model], get_model_config(model), use_distributed_optimizer=False)
    names = {module: name for name, module in chunks[0].named_modules()}
    chosen = sorted(names[module] for module in fusable_layers(chunks))
    return before_wrapping, chosen, fuse_weight_gradient_accumulation(chunks)


def test_fusable_layers_own_a_trainable_weight_with_a_main_grad(tmp_path):
    """Invariant: only layers that own a trainable weight with a DDP main_grad are fused: none before DDP,
    none of a frozen tower, not the output layer of a tied embedding (the embedding's gradient reaches the
    same parameter through autograd); and nothing on the CPU, which has no mixed-dtype GEMM."""
    from mmrl_megatron.models.qwen2_5_vl.tiny import build_tiny_checkpoint

    hf_dir = build_tiny_checkpoint(str(tmp_path / "tiny"))  # tie_word_embeddings=True
    [(before_wrapping, chosen, fused_on_cpu)] = run_on_cpu_ranks(1, _selection, hf_dir)
    with open(os.path.join(hf_dir, "config.json")) as handle:
        layers = json.load(handle)["text_config"]["num_hidden_layers"]
    assert before_wrapping == 0
    assert fused_on_cpu == 0
    per_layer = ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2")
    expected = [f"module.language_model.decoder.layers.{index}.{name}" for index in range(layers) for name in per_layer]
    # the tower is frozen, its merger is not (model.freeze_merger); the tied output layer is left out
    expected += ["module.vision_model.merger.linear_fc1", "module.vision_model.merger.linear_fc2"]
    assert chosen == sorted(expected)


def _main_grads(chunk, batch, steps: int = 2):
    """Every parameter's main_grad after `steps` accumulated forward/backward passes over `batch`."""
    ids, positions, params, pixels, grids = batch
    chunk.zero_grad_buffer()
    for _ in range(steps):
        logits = chunk(ids, positions, params, pixel_values=pixels, image_grid_thw=grids)
        logits.float().logsumexp(-1).mean().backward()
    return {name: p.main_grad.clone() for name, p in chunk.module.named_parameters() if p.requires_grad}


@pytest.mark.gpu
def test_fused_accumulation_gives_the_unfused_gradients(tmp_path):
    """Invariant: with the fusion, two accumulated micro-batches leave the same main_grad in every parameter
    as megatron-core's unfused path (bf16 weight gradient added to the fp32 buffer), the tied embedding
    included; within 1% of each tensor's largest entry (the unfused path rounds each wgrad to bf16)."""
    from megatron.core.utils import get_model_config

    from mmrl_megatron.models.qwen2_5_vl.tiny import build_tiny_checkpoint
    from mmrl_megatron.parallel import ParallelDims, shutdown, start_processes
    from mmrl_megatron.trainer.optim import wrap_for_data_parallel
    from mmrl_megatron.trainer.wgrad_fusion import fusable_layers

    hf_dir = build_tiny_checkpoint(str(tmp_path / "tiny"))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29531", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    device = torch.device("cuda", 0)
    dims = start_processes(ParallelDims(world_size=1), device)
    try:
        from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(0)
        model, config = _tiny_actor(hf_dir, dims, device, "bfloat16")
        [chunk] = wrap_for_data_parallel([model], get_model_config(model), use_distributed_optimizer=False)
        ids, positions, params, (pixels, grids) = packed(make_samples(config))
        params.cu_seqlens_q = params.cu_seqlens_kv = params.cu_seqlens_q.to(device)
        batch = (ids.to(device), positions.to(device), params, pixels.to(device, torch.bfloat16), grids)
        layers = fusable_layers([chunk])
        assert layers and all(layer.gradient_accumulation_fusion for layer in layers)
        fused = _main_grads(chunk, batch)
        assert all(layer.weight.grad_added_to_main_grad for layer in layers)  # the fused kernel ran
        for layer in layers:
            layer.gradient_accumulation_fusion = False
        unfused = _main_grads(chunk, batch)
    finally:
        shutdown()
    assert fused.keys() == unfused.keys()
    for name, expected in unfused.items():
        assert expected.abs().max() > 0, name
        difference = float((fused[name] - expected).abs().max())
        assert difference <= 1e-2 * float(expected.abs().max()), (name, difference)

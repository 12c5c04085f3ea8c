"""Kimi-VL-A3B-shaped model (published widths, few layers) runs forward and backward on one GPU.

Records the step time and peak memory (printed, and appended as a JSON line to $KIMI_VL_GPU_RESULTS
when set) for benchmarks/RESULTS.md. Run: pytest -m gpu -s tests/models/kimi_vl/test_gpu.py
"""
import json
import os
import time

import pytest
import torch

# Kimi-VL-A3B widths (shared/reference/conversion_models.md A.2); depth cut to 3 LM layers (1 dense, 2 MoE)
# and 2 vision layers, so the shape of every kernel is the real one while the model fits any one GPU.
A3B_WIDTHS = dict(
    vocab_size=163840, hidden_size=2048, intermediate_size=11264, moe_intermediate_size=1408, num_hidden_layers=3,
    num_attention_heads=16, num_key_value_heads=16, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
    v_head_dim=128, n_routed_experts=64, num_experts_per_tok=6, n_shared_experts=2, first_k_dense_replace=1,
    initializer_range=0.02, max_position_embeddings=131072,
    vision_hidden_size=1152, vision_intermediate_size=4304, vision_num_attention_heads=16, vision_num_hidden_layers=2,
    vision_init_pos_emb_height=64, vision_init_pos_emb_width=64,
)
IMAGE_GRID = (28, 28)  # 392 x 392 pixels: 784 patches, 196 image tokens
SEQUENCE_TOKENS = 2048
SEQUENCES = 2


def forward_backward(overrides: dict, image_grid, sequence_tokens: int, sequences: int, device: torch.device, dims):
    """One bf16 (fp32 on CPU) forward/backward of the Kimi-VL model on packed sequences, the first holding an image;
    returns (loss, whether every trainable parameter got a finite gradient, seconds of the timed step, peak
    GPU bytes or 0)."""
    from megatron.core.packed_seq_params import PackedSeqParams

    from mmrl_megatron.config.schema import ModelConfig
    from mmrl_megatron.models import build_model
    from mmrl_megatron.models.kimi_vl.tiny import MEDIA_PLACEHOLDER_TOKEN_ID, tiny_config_dict

    dtype = "bfloat16" if device.type == "cuda" else "float32"
    model = build_model(ModelConfig(dtype=dtype), tiny_config_dict(**overrides), dims, "actor")
    model.train()
    rows, cols = image_grid
    image_tokens = rows * cols // 4
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, MEDIA_PLACEHOLDER_TOKEN_ID, (sequences * sequence_tokens,), generator=generator)
    ids[1:1 + image_tokens] = MEDIA_PLACEHOLDER_TOKEN_ID
    ids = ids.unsqueeze(0).to(device)
    bounds = torch.arange(0, sequences + 1, dtype=torch.int32, device=device) * sequence_tokens
    packed = PackedSeqParams(qkv_format="thd", cu_seqlens_q=bounds, cu_seqlens_kv=bounds,
                             max_seqlen_q=sequence_tokens, max_seqlen_kv=sequence_tokens)
    pixels = torch.randn(rows * cols, 3, 14, 14, generator=generator).to(device)
    grid = torch.tensor([[1, rows, cols]])

    def step():
        logits = model(ids, packed_seq_params=packed, pixel_values=pixels, image_grid_thw=grid)
        loss = torch.log_softmax(logits.float(), dim=-1)[0, :-1].gather(-1, ids[0, 1:, None]).mean()
        loss.backward()
        return loss

    step()  # warm-up: kernel selection, allocator growth
    model.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    loss = step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    gradients_finite = all(p.grad is not None and bool(torch.isfinite(p.grad).all())
                           for p in model.parameters() if p.requires_grad)
    return loss.detach(), gradients_finite, seconds, torch.cuda.max_memory_allocated() if device.type == "cuda" else 0


@pytest.mark.gpu
def test_kimi_vl_a3b_widths_forward_backward_on_one_gpu():
    """Invariant: the published widths (MLA 512/128/64, 64 experts top-6, MoonViT 1152) build, run forward
    and backward with an image at native resolution, and give finite gradients everywhere on one GPU."""
    import torch.distributed as dist

    from mmrl_megatron.parallel import ParallelDims, shutdown, start_processes

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    torch.cuda.set_device(0)
    if not dist.is_initialized():
        dist.init_process_group("nccl", rank=0, world_size=1)
    try:
        dims = start_processes(ParallelDims(world_size=1), torch.device("cuda", 0))
        from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(0)
        loss, gradients_finite, seconds, peak = forward_backward(A3B_WIDTHS, IMAGE_GRID, SEQUENCE_TOKENS, SEQUENCES,
                                                                 torch.device("cuda"), dims)
    finally:
        shutdown()
    assert torch.isfinite(loss)
    assert gradients_finite
    assert seconds > 0 and peak > 0
    record = {"test": "kimi_vl_a3b_widths_forward_backward", "device": torch.cuda.get_device_name(0),
              "lm_layers": A3B_WIDTHS["num_hidden_layers"], "vision_layers": A3B_WIDTHS["vision_num_hidden_layers"],
              "tokens": SEQUENCE_TOKENS * SEQUENCES, "image_grid": list(IMAGE_GRID), "dtype": "bfloat16",
              "step_seconds": round(seconds, 4), "peak_gib": round(peak / 2 ** 30, 3),
              "tokens_per_second": round(SEQUENCE_TOKENS * SEQUENCES / seconds, 1)}
    print(json.dumps(record))
    if os.environ.get("KIMI_VL_GPU_RESULTS"):
        with open(os.environ["KIMI_VL_GPU_RESULTS"], "a") as handle:
            handle.write(json.dumps(record) + "\n")

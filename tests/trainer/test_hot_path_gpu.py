"""The trainer's hot path on a GPU reads nothing back from the device: a scoring forward and an update
micro-batch (forward, policy loss with KL and entropy, backward) run under
torch.cuda.set_sync_debug_mode("error"), which raises at the first operation that synchronises the host
with the GPU stream (a .item(), .tolist(), a data-dependent shape, a device-to-host copy).
Run: pytest -m gpu tests/trainer/test_hot_path_gpu.py"""
import json
import os

import pytest
import torch

from tests.models.qwen_inputs import make_samples

RESPONSE_TOKENS = 6


def _micro_batch(config):
    """The shared test samples (two images, text only, a video and an image) split into prompt + 6-token
    response, with every per-token tensor the update reads, packed as the trainer packs them."""
    from mmrl_megatron.models.common.packing import pack_sequences
    from mmrl_megatron.trainer.batch import Sample, build_micro_batch

    samples = []
    for index, sample in enumerate(make_samples(config)):
        ids = sample.ids.tolist()
        trained = Sample(prompt_ids=ids[:-RESPONSE_TOKENS], response_ids=ids[-RESPONSE_TOKENS:], group=0, rollout_logprobs=[-1.0] * RESPONSE_TOKENS,
                         pixel_values=sample.pixel_values, image_grid_thw=sample.grid_thw,
                         position_ids=sample.positions)
        for name in ("old_logprobs", "ref_logprobs", "rollout_logprobs"):
            trained.tensors[name] = torch.full((RESPONSE_TOKENS,), -1.0)
        trained.tensors["advantages"] = torch.full((RESPONSE_TOKENS,), 0.5 - index)
        samples.append(trained)
    return build_micro_batch(samples, pack_sequences)


@pytest.mark.gpu
def test_scoring_and_update_micro_batch_do_not_synchronise(tmp_path, monkeypatch):
    """Invariant (issue 15, acceptance 5): no host synchronisation inside the layers, the log-probs or the
    loss, in a scoring forward or an update micro-batch (bf16, packed, with images); every layer of the
    language model and the tower ropes its query and key through the fused RoPE (fused_rope.py)."""
    from megatron.core.models.common.embeddings import rope_utils

    from mmrl_megatron.models.common import fused_rope
    from mmrl_megatron.config.schema import AlgorithmConfig, ModelConfig
    from mmrl_megatron.convert import load_hf_into_model
    from mmrl_megatron.models import conversion_table
    from mmrl_megatron.models import build_model
    from mmrl_megatron.models.qwen2_5_vl.tiny import build_tiny_checkpoint
    from mmrl_megatron.parallel import ParallelDims, shutdown, start_processes
    from mmrl_megatron.trainer import losses

    hf_dir = build_tiny_checkpoint(str(tmp_path / "tiny"))
    with open(os.path.join(hf_dir, "config.json")) as handle:
        config = json.load(handle)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29527", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    device = torch.device("cuda", 0)
    dims = start_processes(ParallelDims(world_size=1), device)
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    model_parallel_cuda_manual_seed(0)
    try:
        model = build_model(ModelConfig(hf_path=hf_dir, dtype="bfloat16"), config, dims, "actor").cuda()
        rope_calls = []

        def counted_rope(t, freqs, **kwargs):
            rope_calls.append(t.shape)
            return fused_rope.fused_rotary_pos_emb(t, freqs, **kwargs)

        monkeypatch.setattr(rope_utils, "fused_apply_rotary_pos_emb", counted_rope)
        load_hf_into_model(model, hf_dir, conversion_table(model), dims)
        micro_batch = _micro_batch(config).to(device)
        micro_batch.pixel_values = micro_batch.pixel_values.to(torch.bfloat16)
        algorithm = AlgorithmConfig(kl_coef=0.01, entropy_coef=0.001)
        response_tokens = float(RESPONSE_TOKENS * len(micro_batch.samples))
        normaliser = losses.Normaliser(tokens=response_tokens, sequences=float(len(micro_batch.samples)))

        def forward():
            return model(micro_batch.input_ids, micro_batch.position_ids, micro_batch.packed_seq_params,
                         pixel_values=micro_batch.pixel_values, image_grid_thw=micro_batch.image_grid_thw,
                         prompt_mask=micro_batch.prompt_mask, output_rows=micro_batch.output_rows)

        def scoring_and_update():
            with torch.no_grad():
                scores = losses.response_logprobs(forward(), micro_batch, 1.0, dims.tensor_group)
            loss, stats = losses.actor_loss(forward(), micro_batch, algorithm, 1.0, normaliser, dims.tensor_group)
            loss.backward()
            return scores, loss, stats

        model.train()
        scoring_and_update()  # compiles the fused activations (torch.compile may read shapes back)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            scores, loss, stats = scoring_and_update()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert torch.isfinite(scores).all() and torch.isfinite(loss)
        assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
        assert stats["actor/entropy"][1].item() == response_tokens
        layers = config["text_config"]["num_hidden_layers"] + config["vision_config"]["depth"]
        assert len(rope_calls) == 2 * 2 * 2 * layers  # two runs of two forwards, query and key per layer
    finally:
        shutdown()

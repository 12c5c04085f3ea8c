"""actor.cuda_graphs on a GPU: update micro-batches whose shapes repeat replay as CUDA graphs and train as the
eager schedule does. Run: pytest -m gpu tests/trainer/test_update_graphs_gpu.py"""
import json
import os
import warnings

import pytest
import torch

STEPS = 3
LENGTHS = (40, 40, 40, 40, 24)  # two micro-batches of 2 x 40 share a shape; the 24 goes alone
TOKEN_BUDGET = 80


def _samples(token_limit: int):
    from mmrl_megatron.trainer.batch import Sample

    generator = torch.Generator().manual_seed(0)
    samples = []
    for index, length in enumerate(LENGTHS):
        ids = torch.randint(0, token_limit, (length,), generator=generator).tolist()
        prompt = length // 4
        sample = Sample(ids[:prompt], ids[prompt:], group=index, position_ids=torch.arange(length).expand(3, length))
        sample.tensors["old_logprobs"] = torch.full((length - prompt,), -4.0)
        sample.tensors["advantages"] = torch.full((length - prompt,), 1.0 - index / 2)
        samples.append(sample)
    return samples


def _train(hf_dir: str, config: dict, dims, cuda_graphs: bool):
    """(per-step policy-loss sums, entropy sums and gradient norms, fp32 main weights before and after STEPS
    steps, graph replays)."""
    from mmrl_megatron.config.schema import AlgorithmConfig, Config, ModelConfig, OptimizerConfig
    from mmrl_megatron.convert import load_hf_into_model
    from mmrl_megatron.models import build_model, conversion_table
    from mmrl_megatron.models.common.packing import pack_sequences
    from mmrl_megatron.trainer import losses
    from mmrl_megatron.trainer.batch import build_micro_batches
    from mmrl_megatron.trainer.build import build_role

    device = torch.device("cuda", 0)
    model_config = ModelConfig(hf_path=hf_dir, dtype="bfloat16")
    model = build_model(model_config, config, dims, "actor").to(device)
    load_hf_into_model(model, hf_dir, conversion_table(model), dims)
    run_config = Config(model=model_config)
    role = build_role("actor", model, run_config, device, dims, OptimizerConfig(lr=1e-3), cuda_graphs=cuda_graphs)

    def main_weights():
        return torch.cat([p.detach().float().flatten() for group in role.optimizer.param_groups
                          for p in group["params"]])

    initial = main_weights()
    samples = _samples(min(config["image_token_id"], config["vision_start_token_id"]) - 1)
    normaliser = losses.Normaliser(tokens=float(sum(len(s.response_ids) for s in samples)),
                                   sequences=float(len(samples)))
    algorithm = AlgorithmConfig(entropy_coef=0.001)
    losses_and_norms = []
    for _ in range(STEPS):  # new micro-batches every step, as the trainer builds them
        micro_batches = build_micro_batches(samples, TOKEN_BUDGET, pack_sequences)
        stats, grad_norm, stepped = role.train_step(
            micro_batches, lambda output, mb: losses.actor_loss(output, mb, algorithm, 1.0, normaliser, None), 1.0,
            loss_key=(normaliser.tokens, normaliser.sequences))
        assert stepped
        losses_and_norms.append((stats["loss/policy"][0], stats["actor/entropy"][0], grad_norm))
    return losses_and_norms, (initial, main_weights()), role.graphs.replays if role.graphs else 0


@pytest.mark.gpu
def test_replayed_micro_batches_train_as_the_eager_schedule(tmp_path):
    """Invariant: with cuda_graphs the repeated 2 x 40 micro-batch is eager once, then captured and replayed
    (1 + 2 + 2 replays over three steps) while the lone 24 stays eager; every step's policy loss, entropy
    and gradient norm equal the eager schedule's within 1e-4 relative, and the fp32 main weights after three
    steps within 1e-5 (flash attention's backward accumulates in a varying order, so not bit-exact); torch
    never warns that a gradient accumulates on another stream than its producer's (run alone: it warns once
    per process)."""
    from mmrl_megatron.models.qwen2_5_vl.tiny import build_tiny_checkpoint
    from mmrl_megatron.parallel import ParallelDims, shutdown, start_processes

    hf_dir = build_tiny_checkpoint(str(tmp_path / "tiny"))
    with open(os.path.join(hf_dir, "config.json")) as handle:
        config = json.load(handle)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29533", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    dims = start_processes(ParallelDims(world_size=1), torch.device("cuda", 0))
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    model_parallel_cuda_manual_seed(0)
    try:
        eager, eager_weights, eager_replays = _train(hf_dir, config, dims, cuda_graphs=False)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            graphed, graphed_weights, replays = _train(hf_dir, config, dims, cuda_graphs=True)
    finally:
        shutdown()
    assert eager_replays == 0 and replays == 5
    # DDP built on the update's stream: no parameter accumulates its gradient on another stream
    assert not [w for w in caught if "AccumulateGrad node's stream" in str(w.message)]
    for eager_step, graphed_step in zip(eager, graphed):
        assert graphed_step == pytest.approx(eager_step, rel=1e-4)
    (initial, eager_after), (graphed_initial, graphed_after) = eager_weights, graphed_weights
    assert torch.equal(initial, graphed_initial)
    assert (eager_after - initial).abs().max() > 1e-3  # three steps at lr 1e-3 moved the weights
    assert torch.allclose(graphed_after, eager_after, rtol=0, atol=1e-5)

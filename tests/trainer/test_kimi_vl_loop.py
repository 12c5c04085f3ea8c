"""Kimi-VL through the real RL loop on 4 CPU ranks at TP=1, PP=2, EP=2 (so DP=2 and each expert-parallel
group spans two data-parallel ranks holding different prompts): the megatron actor and reference loaded
from a tiny published-layout checkpoint, the embedded engine on every rank, the weight bridge, megatron's
optimizer and checkpointing; only the prompts (ids and pixels built here, so that the ranks' micro-batches
differ in length and number) and the reward are stand-ins. tests/trainer/test_kimi_vl_from_parquet.py runs
the real data path and reward."""
import math
from types import SimpleNamespace

import pytest
import torch

from mmrl_megatron.models.kimi_vl.tiny import MEDIA_PLACEHOLDER_TOKEN_ID as MEDIA
from tests.cpu_ranks import run_on_cpu_ranks
from tests.trainer.stand_ins import StandInDataset

STEPS = 3
LOGPROB_TOLERANCE = 1e-4
MOE_KEYS = ("moe/max_load_ratio", "moe/mean_load_ratio", "moe/dropped_token_fraction", "moe/layers")


class ImagePrompts(StandInDataset):
    """One image per prompt (grids 4x4 and 4x6 patches alternate); data-parallel rank r's prompts carry
    8 + 10 r text tokens, so the ranks' micro-batches differ in length and number."""

    def prompt(self, index: int) -> SimpleNamespace:
        generator = torch.Generator().manual_seed(index)
        rows, cols = (4, 4) if index % 2 == 0 else (4, 6)
        text = torch.randint(3, 240, (8 + 10 * self.dp_rank,), generator=generator).tolist()
        prompt_ids = [0] + text[:3] + [MEDIA] * (rows * cols // 4) + text[3:]
        pixel_values = torch.randn(rows * cols, 3, 14, 14, generator=generator)
        return SimpleNamespace(index=index, prompt_ids=prompt_ids, pixel_values=pixel_values,
                               image_grid_thw=torch.tensor([[1, rows, cols]]), images=[], prompt_text="",
                               ground_truth="", data_source="synthetic", extra_info={}, messages=[],
                               second_per_grid_ts=[])


class RecordingTracker:
    def __init__(self):
        self.steps = {}

    def log(self, step, metrics):
        self.steps[step] = dict(metrics)

    def close(self):
        pass


def _kimi_trainer(config):
    """A Trainer from the parts build_trainer assembles, with ImagePrompts and the stand-in reward."""
    import os

    import torch.distributed as dist

    from mmrl_megatron.bridge import WeightBridge
    from mmrl_megatron.config.validate import model_shape
    from mmrl_megatron.models.hf_config import read_hf_config
    from mmrl_megatron.models.common.packing import pack_sequences
    from mmrl_megatron.parallel import ParallelDims, start_processes
    from mmrl_megatron.rollout import build_engine
    from mmrl_megatron.trainer.build import build_role, load_model
    from mmrl_megatron.trainer.checkpoint import Checkpointer
    from mmrl_megatron.trainer.experience import ExperienceSources
    from mmrl_megatron.trainer.loop import Trainer, TrainerParts
    from mmrl_megatron.models.family import position_rule
    from mmrl_megatron.trainer.state import TrainerState
    from tests.trainer.stand_ins import StandInReward

    hf_dir = config.model.hf_path
    hf_config, device = read_hf_config(hf_dir), torch.device("cpu")
    dims = start_processes(ParallelDims.from_config(config, dist.get_world_size(), model_shape(hf_config)), device,
                           config.trainer.seed)
    actor = build_role("actor", load_model(config, hf_config, "actor", device, dims), config, device, dims,
                       config.actor.optim)
    reference = build_role("reference", load_model(config, hf_config, "actor", device, dims), config, device, dims)
    engine = build_engine(config, hf_dir, device)
    dataset = ImagePrompts(config.data.prompts_per_step // dims.data, dims.data_parallel_rank)
    sources = ExperienceSources(prompts=iter(dataset), engine=engine, reward=StandInReward(),
                                decode=lambda ids: " ".join(map(str, ids)),
                                positions=position_rule(hf_config, config.model.family), dims=dims)
    bridge = WeightBridge([chunk.module for chunk in actor.chunks], engine, config.rollout.sync_bucket_mb << 20, dims)
    parts = TrainerParts(config=config, device=device, dims=dims, actor=actor, reference=reference, critic=None,
                         sources=sources, bridge=bridge, pack_sequences=pack_sequences, tracker=RecordingTracker(),
                         checkpointer=Checkpointer(os.path.join(config.trainer.run_dir, "checkpoints"),
                                                   {"actor": actor}, TrainerState(), dims, dataset),
                         dataset=dataset, parameter_count=1.0)
    return Trainer(parts)


def _count_micro_batches(role):
    """Record how many micro-batches each update of `role` gets (this rank's own, before any filler)."""
    counts, train_step = [], role.train_step

    def counting(micro_batches, *args, **kwargs):
        counts.append(len(micro_batches))
        return train_step(micro_batches, *args, **kwargs)

    role.train_step = counting
    return counts


def _three_grpo_steps(run_dir, hf_dir):
    """Run the loop, then compare the engine's tensors with the actor's export after the final sync."""
    from mmrl_megatron.convert import iter_hf_tensors
    from mmrl_megatron.convert.hf_checkpoint import HFCheckpoint
    from tests.trainer.stand_ins import stand_in_config

    config = stand_in_config(run_dir, [
        f"model.hf_path={hf_dir}", "parallel.pipeline=2", "parallel.expert=2", "algorithm.advantage=grpo",
        "rollout.n=4", "rollout.max_new_tokens=6", "actor.micro_batch_tokens=64", "rollout.release_memory=true",
        "rollout.verify_weight_sync=true", "rollout.sync_bucket_mb=1"])
    trainer = _kimi_trainer(config)
    micro_batch_counts = _count_micro_batches(trainer.parts.actor)
    trainer.run()

    dims = trainer.parts.dims
    exported = dict(iter_hf_tensors([chunk.module for chunk in trainer.parts.actor.chunks], dims))
    experts = sorted(name for name in exported if ".mlp.experts." in name)
    biases = sorted(name for name in exported if name.endswith("e_score_correction_bias"))
    in_engine = trainer.parts.sources.engine.get_weights(experts + biases)
    checkpoint = HFCheckpoint(hf_dir)
    return {
        "step": trainer.state.step, "metrics": trainer.parts.tracker.steps,
        "dp_rank": dims.data_parallel_rank, "micro_batch_counts": micro_batch_counts,
        "experts": len(experts),
        "engine_differs": [name for name in experts + biases if not torch.equal(in_engine[name], exported[name])],
        "trained_experts": sum(not torch.equal(exported[name], checkpoint.get(name)) for name in experts),
        "moved_biases": [name for name in biases if not torch.equal(exported[name], checkpoint.get(name))],
    }


@pytest.fixture(scope="module")
def per_rank(tmp_path_factory):
    from mmrl_megatron.models.kimi_vl.tiny import build_tiny_checkpoint

    root = tmp_path_factory.mktemp("kimi_vl_loop")
    hf_dir = build_tiny_checkpoint(str(root / "hf"), seed=3)
    return run_on_cpu_ranks(4, _three_grpo_steps, str(root / "run"), hf_dir)


def test_three_grpo_steps_with_expert_parallelism(per_rank):
    """Invariant (issue 8, acceptance 3): three GRPO steps complete at TP=1/PP=2/EP=2 with finite losses and
    gradient norms, with MoE routing metrics in every step, although the data-parallel ranks sharing an
    expert-parallel group ran different numbers of micro-batches of different lengths."""
    for rank in per_rank:
        assert rank["step"] == STEPS and sorted(rank["metrics"]) == [1, 2, 3]
        for step, metrics in rank["metrics"].items():
            for key in ("loss/policy", "kl/mean", "actor/grad_norm", "reward/mean"):
                assert math.isfinite(metrics[key]), (step, key, metrics.get(key))
            assert metrics["moe/layers"] == 3.0  # 4 layers, the first dense
            assert metrics["moe/max_load_ratio"] >= metrics["moe/mean_load_ratio"] >= 1.0
            assert metrics["moe/dropped_token_fraction"] == 0.0
    counts = {rank["dp_rank"]: rank["micro_batch_counts"] for rank in per_rank}
    assert len(counts[0]) == len(counts[1]) == STEPS and counts[0] != counts[1]


def test_engine_experts_equal_actor_after_final_sync(per_rank):
    """Invariant: after the last weight sync every routed-expert tensor (and router bias) in each rank's
    engine equals the actor's exported tensor bit for bit (fp32); training moved the experts, and the router's
    expert bias stayed exactly the checkpoint's (moe_router_bias_update_rate 0)."""
    for rank in per_rank:
        assert rank["experts"] == 3 * 4 * 3  # MoE layers x experts x (gate, up, down)
        assert rank["engine_differs"] == []
        assert rank["trained_experts"] > 0
        assert rank["moved_biases"] == []


def test_engine_logprobs_match_actor_scoring(per_rank):
    """Invariant: in every step the engine's log-probs of its own samples (prompts with images) equal the
    megatron actor's old log-probs of them (EP=2, PP=2, fp32) within 1e-4: rollout/logprob_abs_diff_max."""
    for rank in per_rank:
        for step, metrics in rank["metrics"].items():
            assert metrics["rollout/logprob_abs_diff_max"] < LOGPROB_TOLERANCE, (step, metrics)

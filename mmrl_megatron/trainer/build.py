"""Build every part of a run from a Config on this rank and hand them to the loop (trainer/loop.py).

The caller has started the processes for the run's layout (parallel.start_processes with a ParallelDims, which
every part that communicates is handed). Order: seeds -> models (actor, reference, critic) with their
optimizers -> checkpoint resume -> data, rewards, rollout engine, weight bridge -> tracker.
"""
import logging
import os
from dataclasses import asdict, replace
from typing import Optional

import torch
import torch.distributed as dist

from ..algorithms import advantage_estimator
from ..config.schema import Config
from ..models.family import position_rule
from ..models.hf_config import read_hf_config
from ..parallel import ParallelDims, seed_ranks
from .checkpoint import Checkpointer, export_hf
from .experience import ExperienceSources
from .loop import Trainer, TrainerParts
from .optim import build_optimizer, wrap_for_data_parallel
from .roles import ModelRole
from .state import TrainerState
from .update_graphs import UpdateGraphs, on_update_stream
from .tracking import build_tracker, progress
from .evaluation import evaluate, task_metrics_from_config
from .warmup import supervised_samples, supervised_warmup

logger = logging.getLogger(__name__)
REFIT_PROBE_PROMPTS = 2  # prompts the engine decodes after each sync when it cannot return weights by name


def _total_optimizer_steps(config: Config) -> int:
    return max(config.trainer.steps * config.actor.ppo_epochs * config.actor.mini_batches_per_step, 1)


def with_model_files(config: Config) -> Config:
    """With model.mcore_checkpoint the weights come from that megatron checkpoint (every rank reads only its
    shards) and, when model.hf_path is empty, config.json, tokenizer and processor from the hf/ files kept
    inside it: returns the config with model.hf_path naming those files. Unchanged without the key."""
    from ..config import ConfigError
    from ..convert.checkpoint_io import hf_files_dir, is_mcore_checkpoint

    checkpoint = config.model.mcore_checkpoint
    if not checkpoint:
        return config
    if not is_mcore_checkpoint(checkpoint):
        raise ConfigError(f"model.mcore_checkpoint: {checkpoint} is not a megatron-core distributed checkpoint; "
                          "write one with tools/checkpoint_convert/hf_to_mcore.py")
    needs_critic = advantage_estimator(config.algorithm.advantage).needs_critic
    if needs_critic and not (config.critic.hf_path or config.model.hf_path):
        raise ConfigError("model.mcore_checkpoint holds the actor only (no value head) and model.hf_path is empty: "
                          "set critic.hf_path (or model.hf_path) to an HF directory to start the critic from")
    if not config.model.hf_path and config.rollout.backend == "sglang" and not config.rollout.sglang.urls \
            and not any(arg.startswith("--load-format") for arg in config.rollout.sglang.extra_args):
        raise ConfigError("model.mcore_checkpoint without model.hf_path: the SGLang server we launch would find no "
                          "weights in the checkpoint's hf/ files; set model.hf_path, or pass "
                          "rollout.sglang.extra_args=[--load-format,dummy] (the first weight sync fills it)")
    return replace(config, model=replace(config.model, hf_path=config.model.hf_path or hf_files_dir(checkpoint)))


def load_model(config: Config, hf_config, role: str, device: torch.device, dims: ParallelDims,
               hf_path: Optional[str] = None):
    """This pipeline stage's model for role ("actor" or "critic"), filled from hf_path (the critic's own HF
    directory), else model.mcore_checkpoint (an actor's weights: not the critic's), else model.hf_path."""
    from ..models import build_model, load_model_weights

    model = build_model(config.model, hf_config, dims, role)
    model.to(device)
    checkpoint = config.model.mcore_checkpoint if role != "critic" else None
    load_model_weights(model, hf_path or checkpoint or config.model.hf_path, dims)
    return model


def check_cuda_graphs(transformer_config, config: Config, device: torch.device, dims: ParallelDims) -> None:
    """actor.cuda_graphs captures a micro-batch's whole forward + backward on one GPU: refuse layouts and
    models where that is not the whole of it."""
    from ..config import ConfigError

    problems = [problem for problem, present in (
        ("a CUDA device", device.type != "cuda"),
        # megatron-core's schedule scales the loss by the context-parallel size, and tensor-parallel layers
        # communicate inside the forward: the graph covers a model held whole by one GPU
        ("the model on one GPU (parallel.tensor, pipeline and context 1; data parallelism is fine)",
         dims.tensor * dims.pipeline * dims.layout.context > 1),
        ("a dense model (MoE routing reads token counts on the host)", bool(transformer_config.num_moe_experts)),
        ("model.recompute=none", config.model.recompute != "none")) if present]
    if problems:
        raise ConfigError(f"actor.cuda_graphs=true needs {', '.join(problems)}; set actor.cuda_graphs=false")


def build_role(name: str, model, config: Config, device: torch.device, dims: ParallelDims, optim_config=None,
               offload: bool = False, cuda_graphs: bool = False) -> ModelRole:
    """Frozen when optim_config is None; otherwise DDP-wrapped with megatron-core's optimizer and schedule
    (and with cuda_graphs, update micro-batches whose shapes repeat replay as CUDA graphs)."""
    from megatron.core.utils import get_model_config

    transformer_config = get_model_config(model)
    if cuda_graphs:
        check_cuda_graphs(transformer_config, config, device, dims)
    transformer_config.variable_seq_lengths = True  # packed micro-batches differ in length between pipeline stages
    if optim_config is None:
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        return ModelRole(name, [model], device, dims, offload_between_uses=offload)
    graphs = UpdateGraphs(device) if cuda_graphs else None
    # with graphs, DDP is built on the stream the update runs and is captured on (update_graphs.py says why)
    with on_update_stream(graphs):
        chunks = wrap_for_data_parallel([model], transformer_config,
                                        optim_config.use_distributed_optimizer and device.type == "cuda")
    optimizer, scheduler = build_optimizer(chunks, optim_config, _total_optimizer_steps(config),
                                           config.model.dtype == "bfloat16", device)
    return ModelRole(name, chunks, device, dims, optimizer, scheduler, graphs=graphs)


def _unwrapped(chunks):
    return [getattr(chunk, "module", chunk) for chunk in chunks]


def _parameter_count(chunks, device, dims: ParallelDims) -> float:
    count = torch.tensor([float(sum(p.numel() for p in _unwrapped(chunks)[0].parameters()))], device=device)
    dist.all_reduce(count, group=dims.model_parallel_group)
    return float(count)


def resolve_recompute(config: Config, device: torch.device) -> None:
    """model.recompute=auto becomes what the memory planner chooses for this GPU (none on the CPU), logged."""
    if config.model.recompute != "auto":
        return
    if device.type != "cuda":
        config.model.recompute = "none"
        return
    from ..parallel.memory_plan import GIB, choose_recompute
    from ..models.planner_dims import resolve_model_dims

    gpu_gib = torch.cuda.get_device_properties(device).total_memory / GIB
    config.model.recompute = choose_recompute(config, resolve_model_dims(config.model.hf_path), dist.get_world_size(),
                                              gpu_gib)
    if dist.get_rank() == 0:
        logger.info("model.recompute=auto: the memory planner chose %s for %.0f GiB GPUs", config.model.recompute,
                    gpu_gib)


def build_trainer(config: Config, dims: ParallelDims, device: torch.device) -> Trainer:
    """Every part of the run on this rank, in the started layout `dims` (ParallelDims.from_config of `config`);
    resumes from the latest checkpoint when trainer.resume allows."""
    from transformers import AutoTokenizer

    from ..algorithms.config_check import check_algorithm_config
    from ..bridge import WeightBridge
    from ..data import PromptDataset
    from ..models.common.packing import pack_sequences
    from ..rewards import build_reward_function
    from ..rollout import build_engine
    from ..rollout.multi_turn import build_multi_turn

    check_algorithm_config(config)  # imports algorithm.plugins in this process, so their names resolve
    config = with_model_files(config)
    trainer_config, algorithm = config.trainer, config.algorithm
    resolve_recompute(config, device)
    # seeded here rather than by start_processes: the demo assets built since then on rank 0 reseed torch's generator
    seed_ranks(trainer_config.seed)
    hf_config = read_hf_config(config.model.hf_path)

    actor = build_role("actor", load_model(config, hf_config, "actor", device, dims), config, device, dims,
                       config.actor.optim, cuda_graphs=config.actor.cuda_graphs)
    reference = None
    if algorithm.kl_coef > 0:
        reference = build_role("reference", load_model(config, hf_config, "actor", device, dims), config, device,
                               dims, offload=config.actor.offload_reference)
    critic = None
    if advantage_estimator(algorithm.advantage).needs_critic:
        critic = build_role("critic", load_model(config, hf_config, "critic", device, dims, config.critic.hf_path),
                            config, device, dims, config.critic.optim)
    data_parallel, dp_rank = dims.data, dims.data_parallel_rank
    dataset = PromptDataset(config.data.train_files, config.data, config.model.hf_path,
                            config.data.prompts_per_step // data_parallel, dp_rank, data_parallel, train=True)
    trainable = {"actor": actor, **({"critic": critic} if critic else {})}
    checkpointer = Checkpointer(os.path.join(trainer_config.run_dir, "checkpoints"), trainable, TrainerState(), dims,
                                dataset, config.model.hf_path, trainer_config.keep_last)
    resumed = checkpointer.resume(trainer_config.resume)
    if resumed:
        logger.info("resumed from %s at step %d", resumed, checkpointer.trainer_state.step)

    tokenizer = AutoTokenizer.from_pretrained(config.model.hf_path)
    positions = position_rule(hf_config, config.model.family)
    engine = build_engine(config, config.model.hf_path, device)
    reward = build_reward_function(config.reward, config.data, device=str(device))

    def decode(ids):
        return tokenizer.decode(ids, skip_special_tokens=True)

    sources = ExperienceSources(prompts=iter(dataset), engine=engine, reward=reward, decode=decode, positions=positions,
                                dims=dims, multi_turn=build_multi_turn(config, engine, dataset.processor, decode))
    probe = None
    if config.rollout.verify_weight_sync and not engine.reads_weights_by_name:
        from .refit_probe import build_refit_probe

        # the first training prompts, the same on every rank, read apart from the training stream
        probe_prompts = next(iter(PromptDataset(config.data.train_files, config.data, config.model.hf_path,
                                                REFIT_PROBE_PROMPTS, 0, 1, train=False)))
        probe = build_refit_probe(probe_prompts, actor, positions, pack_sequences, config.actor.micro_batch_tokens)
    bridge = WeightBridge(_unwrapped(actor.chunks), engine, config.rollout.sync_bucket_mb << 20, dims, probe=probe)
    tracker = build_tracker(config.logging, trainer_config.run_dir, dist.get_rank() == 0,
                            resolved_config=asdict(config))
    parts = TrainerParts(config=config, device=device, dims=dims, actor=actor, reference=reference, critic=critic,
                         sources=sources, bridge=bridge, pack_sequences=pack_sequences, tracker=tracker,
                         checkpointer=checkpointer, dataset=dataset,
                         parameter_count=_parameter_count(actor.chunks, device, dims))
    trainer = Trainer(parts)
    if config.data.val_files:
        validation = PromptDataset(config.data.val_files, config.data, config.model.hf_path,
                                   max(config.data.prompts_per_step // data_parallel, 1), dp_rank, data_parallel,
                                   train=False)
        task_metrics = task_metrics_from_config(config)  # evaluation.metrics: val/<data_source>/<key>
        parts.evaluate = lambda: evaluate(validation, sources, config.rollout.max_new_tokens,
                                          config.rollout.temperature, config.rollout.n, task_metrics)
    if trainer_config.warmup_sft_steps:
        end_ids = [dataset.processor.end_of_turn_token_id]  # the family's, as its chat template closes a turn

        def make_samples(prompts):
            return supervised_samples(prompts, lambda text: tokenizer.encode(text, add_special_tokens=False),
                                      trainer_config.warmup_sft_template, end_ids, positions)

        parts.warmup = lambda: tracker.log(0, supervised_warmup(
            actor, sources.prompts, trainer_config.warmup_sft_steps, trainer_config.warmup_sft_lr,
            config.actor.optim.grad_clip, config.actor.micro_batch_tokens, pack_sequences, make_samples,
            trainer.normaliser, progress))
    if trainer_config.export_hf:
        parts.export = lambda: export_hf(_unwrapped(actor.chunks), dims, config.model.hf_path,
                                         os.path.join(trainer_config.run_dir, "hf_export"))
    return trainer


def close_trainer(trainer: Trainer) -> None:
    parts = trainer.parts
    parts.tracker.close()
    parts.sources.reward.close()
    parts.sources.engine.shutdown()

"""The RL loop, one method per step of DESIGN.md:

1. prompts -> 2. rollout (RolloutEngine) -> 3. reward -> 4. old/reference log-probs (and values) ->
5. advantages -> 6. update (megatron pipeline schedule) -> 7. weight sync (bridge) -> 8. metrics + checkpoint.
Steps 1-3 live in experience.py; the parts are built by build.py and handed in as TrainerParts.
"""
import logging
import os
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch
import torch.distributed as dist

from .. import algorithms
from ..config.schema import Config
from ..rollout import SamplingParams
from . import losses
from .batch import MicroBatch, Sample, build_micro_batches, response_mask
from .experience import ExperienceSources, collect_experience
from .offload import rollout_offload_for
from .metrics import (add_stats, finish_reward_std, reduce_across_ranks, rollout_stats, summed_counters,
                      throughput_metrics)
from .roles import ModelRole

logger = logging.getLogger(__name__)
STOP_FILE = "SAVE_AND_EXIT"  # made in the run directory to ask for a checkpoint and a clean exit


class TrainingError(RuntimeError):
    """The run cannot continue (repeated non-finite losses); the message names the step."""


@dataclass
class TrainerParts:
    config: Config
    device: torch.device
    dims: object  # parallel.ParallelDims, started
    actor: ModelRole
    reference: Optional[ModelRole]
    critic: Optional[ModelRole]
    sources: ExperienceSources
    bridge: object  # bridge.WeightBridge
    pack_sequences: Callable
    tracker: object
    checkpointer: object  # checkpoint.Checkpointer: owns the TrainerState the loop advances
    dataset: object  # data.PromptDataset (state_dict, metrics)
    parameter_count: float
    evaluate: Optional[Callable[[], Dict[str, float]]] = None
    warmup: Optional[Callable[[], Dict[str, float]]] = None
    export: Optional[Callable[[], None]] = None


class Trainer:
    def __init__(self, parts: TrainerParts):
        self.parts = parts
        self.config = parts.config
        self.algorithm = parts.config.algorithm
        self.estimator = algorithms.advantage_estimator(self.algorithm.advantage)
        self.state = parts.checkpointer.trainer_state  # saved and restored by the checkpointer
        self.offload = rollout_offload_for(parts)

    # -- steps 1-3 -----------------------------------------------------------------------------------
    def sampling(self, step: int) -> SamplingParams:
        rollout = self.config.rollout
        seed = self.config.trainer.seed * 1_000_003 + step * 1_009 + self.parts.dims.data_parallel_rank
        return SamplingParams(n=rollout.n, temperature=rollout.temperature, top_p=rollout.top_p, top_k=rollout.top_k,
                              max_new_tokens=rollout.max_new_tokens, stop=list(rollout.stop), seed=seed)

    def generate_and_reward(self, step: int):
        sampling = self.sampling(step)
        samples, all_scores, _ = collect_experience(
            self.parts.sources, sampling, self.algorithm.dynamic_sampling, self.algorithm.max_refill_rounds,
            self.algorithm.overlong_buffer, self.algorithm.overlong_penalty)
        if self.config.rollout.release_memory:
            self.parts.sources.engine.release_memory()
        return samples, all_scores

    # -- step 4 --------------------------------------------------------------------------------------
    def on_policy_update(self, samples: List[Sample]) -> bool:
        """Whether the update's one optimizer step sees the weights that generated: one epoch, one
        mini-batch, and an estimator that reads no old log-probs (a KL-shaped reward does, before the update).
        Then the old log-probs equal the update's own (detached), and the old-policy scoring pass is skipped."""
        return (self.config.actor.ppo_epochs == 1 and len(self.mini_batches(samples)) == 1
                and "old_logprobs" not in self.estimator.tensors_needed(self.algorithm))

    def score_with_models(self, micro_batches: List[MicroBatch], on_policy: bool) -> None:
        temperature = self.config.rollout.temperature or 1.0
        tensor_group = self.parts.dims.tensor_group

        def logprobs(output, micro_batch):
            return losses.response_logprobs(output, micro_batch, temperature, tensor_group)

        if not on_policy:
            self.parts.actor.score(micro_batches, logprobs, "old_logprobs")
        if self.parts.reference is not None:
            self.parts.reference.score(micro_batches, logprobs, "ref_logprobs")
        if self.parts.critic is not None:
            self.parts.critic.score(micro_batches, lambda output, mb: mb.response_view(output.float()), "old_values")

    # -- step 5 --------------------------------------------------------------------------------------
    def compute_advantages(self, samples: List[Sample]) -> Dict:
        """Fill each sample's advantages (and returns, for an estimator with a critic) with the registered
        estimator algorithm.advantage names; returns statistics (the critic's explained variance)."""
        mask = response_mask(samples)

        def stacked(name):
            return torch.stack([torch.nn.functional.pad(s.tensors[name], (0, mask.shape[1] - len(s.response_ids)))
                                for s in samples])

        needed = self.estimator.tensors_needed(self.algorithm)
        inputs = algorithms.AdvantageInputs(scores=torch.tensor([s.score for s in samples]), mask=mask,
                                            group_size=self.config.rollout.n, config=self.algorithm,
                                            tensors={name: stacked(name) for name in needed})
        result = self.estimator.compute(inputs)
        advantages, returns, stats = result.advantages, result.returns, {}
        if returns is not None and "old_values" in inputs.tensors:
            variance = algorithms.explained_variance(inputs.tensors["old_values"], returns, mask)
            stats["critic/explained_variance"] = (float(variance), 1.0)
        for row, sample in enumerate(samples):
            length = len(sample.response_ids)
            sample.tensors["advantages"] = advantages[row, :length].clone()
            if sample.rollout_logprobs is not None:
                sample.tensors["rollout_logprobs"] = torch.tensor(sample.rollout_logprobs, dtype=torch.float32)
            if returns is not None:
                sample.tensors["returns"] = returns[row, :length].clone()
        return stats

    # -- step 6 --------------------------------------------------------------------------------------
    def normaliser(self, samples: List[Sample]) -> losses.Normaliser:
        """Global trained response tokens and sequences divided by the data-parallel size (DDP averages gradients)."""
        dims = self.parts.dims
        totals = torch.tensor([float(sum(s.trained_tokens for s in samples)), float(len(samples))],
                              device=self.parts.device)
        dist.all_reduce(totals, group=dims.data_parallel_group)
        data_parallel = dims.data
        return losses.Normaliser(tokens=float(totals[0]) / data_parallel, sequences=float(totals[1]) / data_parallel)

    def mini_batches(self, samples: List[Sample]) -> List[List[Sample]]:
        """Split by whole prompt groups into actor.mini_batches_per_step parts."""
        n = self.config.rollout.n
        groups = [samples[i:i + n] for i in range(0, len(samples), n)]
        parts = max(1, min(self.config.actor.mini_batches_per_step, len(groups)))
        return [[s for group in groups[k::parts] for s in group] for k in range(parts)]

    def update(self, samples: List[Sample], step: int, on_policy: bool = False) -> Dict:
        """on_policy (on_policy_update): the old-policy pass was skipped; the update keeps its own log-probs."""
        stats = {}
        temperature = self.config.rollout.temperature or 1.0
        tensor_group = self.parts.dims.tensor_group
        budget = self.config.actor.micro_batch_tokens
        for _ in range(self.config.actor.ppo_epochs):
            for mini_batch in self.mini_batches(samples):
                micro_batches = build_micro_batches(mini_batch, budget, self.parts.pack_sequences)
                normaliser = self.normaliser(mini_batch)
                actor_stats, grad_norm, stepped = self.parts.actor.train_step(
                    micro_batches,
                    lambda output, mb: losses.actor_loss(output, mb, self.algorithm, temperature, normaliser,
                                                         tensor_group),
                    self.config.actor.optim.grad_clip, keep=("old_logprobs",) if on_policy else (),
                    loss_key=(normaliser.tokens, normaliser.sequences))
                self.count_nonfinite(stepped, step)
                add_stats(stats, actor_stats)
                add_stats(stats, {"actor/grad_norm": (grad_norm, 1.0)} if stepped else {})
                if self.parts.critic is not None:
                    critic_stats, critic_norm, critic_stepped = self.parts.critic.train_step(
                        micro_batches,
                        lambda output, mb: losses.critic_loss(output, mb, self.config.critic.value_clip, normaliser,
                                                              self.algorithm.loss_agg),
                        self.config.critic.optim.grad_clip)
                    add_stats(stats, critic_stats)
                    add_stats(stats, {"critic/grad_norm": (critic_norm, 1.0)} if critic_stepped else {})
        stats["actor/lr"] = (self.parts.actor.lr(), 1.0)
        return stats

    def count_nonfinite(self, stepped: bool, step: int) -> None:
        state = self.state
        if stepped:
            state.consecutive_nonfinite = 0
            return
        state.nonfinite_skips += 1
        state.consecutive_nonfinite += 1
        limit = self.config.trainer.max_nonfinite_skips
        logger.warning("step %d: non-finite loss or gradient norm; update skipped (%d in a row, limit %d)",
                       step, state.consecutive_nonfinite, limit)
        if state.consecutive_nonfinite >= limit:
            raise TrainingError(f"step {step}: {state.consecutive_nonfinite} updates in a row had a non-finite loss "
                                f"or gradient norm (trainer.max_nonfinite_skips={limit}); lower actor.optim.lr, "
                                "check the rewards for NaN, or resume from an earlier checkpoint")

    # -- step 7 --------------------------------------------------------------------------------------
    def sync_weights(self) -> Dict[str, float]:
        engine = self.parts.sources.engine
        offload = self.offload.before_engine_resumes()  # the update is done: its states leave the device
        if self.config.rollout.release_memory:
            engine.resume_memory()
        stats = self.parts.bridge.sync()
        if self.config.rollout.verify_weight_sync:
            self.parts.bridge.verify()
        offload.update(self.offload.after_weight_sync())
        return {"weight_sync/seconds": stats.seconds, "weight_sync/gigabytes": stats.gigabytes,
                "weight_sync/gb_per_s": stats.gb_per_s, **offload}

    # -- one step: the eight steps in order ------------------------------------------------------------
    def train_step(self, step: int) -> Dict[str, float]:
        times = {}
        start = time.perf_counter()
        samples, all_scores = self.generate_and_reward(step)  # steps 1-3
        times["time/generate_and_reward_s"] = time.perf_counter() - start
        times.update(self.offload.after_rollout())  # what the offload switches moved off the device returns

        mark = time.perf_counter()
        actor = self.config.actor
        micro_batches = build_micro_batches(samples, actor.scoring_micro_batch_tokens or actor.micro_batch_tokens,
                                            self.parts.pack_sequences)
        on_policy = self.on_policy_update(samples)
        self.score_with_models(micro_batches, on_policy)  # step 4
        times["time/logprob_s"] = time.perf_counter() - mark

        advantage_stats = self.compute_advantages(samples)  # step 5

        mark = time.perf_counter()
        train_stats = add_stats(self.update(samples, step, on_policy), advantage_stats)  # step 6
        times["time/update_s"] = time.perf_counter() - mark

        sync_metrics = self.sync_weights()  # step 7
        times["time/weight_sync_s"] = sync_metrics["weight_sync/seconds"]
        times["time/step_s"] = time.perf_counter() - start

        return self.step_metrics(samples, all_scores, train_stats, times, sync_metrics, on_policy)  # step 8

    def step_metrics(self, samples, all_scores, train_stats, times, sync_metrics, on_policy) -> Dict[str, float]:
        stats, maxima = rollout_stats(samples, all_scores, self.config.rollout.max_new_tokens)
        add_stats(stats, train_stats)
        tokens = float(sum(s.length for s in samples))
        generated = float(sum(s.trained_tokens for s in samples))
        metrics = reduce_across_ranks(stats, maxima)
        totals = torch.tensor([tokens, generated], device=self.parts.device)
        data_parallel_group = self.parts.dims.data_parallel_group
        dist.all_reduce(totals, group=data_parallel_group)
        finish_reward_std(metrics)
        scoring_passes = (not on_policy) + (self.parts.reference is not None) + (self.parts.critic is not None)
        train_passes = self.config.actor.ppo_epochs * (1 + (self.parts.critic is not None))
        metrics.update(throughput_metrics(float(totals[0]), scoring_passes, train_passes, float(totals[1]),
                                          self.parts.parameter_count, times, dist.get_world_size(),
                                          self.parts.device))
        metrics.update(times)
        metrics.update(sync_metrics)
        # every model-parallel rank of a data-parallel rank reads the same rows; each rank scores its own share
        metrics.update(summed_counters(self.parts.dataset.metrics(), data_parallel_group))
        metrics.update(summed_counters(self.parts.sources.reward.metrics()))
        metrics["train/nonfinite_skips"] = float(self.state.nonfinite_skips)
        return metrics

    # -- the run ---------------------------------------------------------------------------------------
    def run(self) -> Dict[str, float]:
        """Warm-up (once), then RL steps from the resumed step to trainer.steps; returns the last metrics."""
        state, trainer = self.state, self.config.trainer
        if not state.warmup_done and self.parts.warmup is not None:
            self.parts.warmup()
        state.warmup_done = True
        self.sync_weights()
        if state.step == 0 and self.parts.evaluate is not None:
            self.parts.tracker.log(0, self.parts.evaluate())
        metrics = {}
        for step in range(state.step + 1, trainer.steps + 1):
            metrics = self.train_step(step)
            state.step = step
            if self.parts.evaluate is not None and trainer.eval_every and (step % trainer.eval_every == 0
                                                                            or step == trainer.steps):
                metrics.update(self.parts.evaluate())
            self.parts.tracker.log(step, metrics)  # step 8
            stop = self.stop_requested()
            periodic = trainer.save_every > 0 and step % trainer.save_every == 0
            if stop or (trainer.save_every >= 0 and (periodic or step == trainer.steps)):
                self.save_checkpoint()
            if stop:
                self.clear_stop_request()
                logger.warning("step %d: %s found; checkpoint saved, stopping", step, STOP_FILE)
                return metrics
        if trainer.export_hf and self.parts.export is not None:
            with self.offload.onloaded():
                self.parts.export()
        return metrics

    def stop_requested(self) -> bool:
        """Whether <run_dir>/SAVE_AND_EXIT exists (slurm/common.sh makes it before the time limit), on all ranks."""
        seen = os.path.exists(os.path.join(self.config.trainer.run_dir, STOP_FILE)) and dist.get_rank() == 0
        flag = torch.tensor([float(seen)], device=self.parts.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def clear_stop_request(self) -> None:
        """Remove SAVE_AND_EXIT once its checkpoint is saved, so that a plain relaunch trains on (rank 0)."""
        if dist.get_rank() == 0:
            try:
                os.remove(os.path.join(self.config.trainer.run_dir, STOP_FILE))
            except FileNotFoundError:  # removed by hand meanwhile: nothing left to do
                pass

    def save_checkpoint(self) -> None:
        with self.offload.onloaded():
            self.parts.checkpointer.save()

"""The loss functions the roles run on the last pipeline stage: they turn model output for one packed
micro-batch into a mini-batch-normalised scalar plus statistics, using the pure algorithm functions.

Statistics are (sum, count) pairs so that micro-batches and ranks combine into exact means (token means
for losses, whatever the loss aggregation). They stay on the device as 0-d tensors: the role adds them up
and reads them once per update, so no micro-batch waits for the GPU.
"""
from dataclasses import dataclass
from typing import Dict, Tuple

import torch

from .. import algorithms
from ..config.schema import AlgorithmConfig
from .batch import MicroBatch

Stats = Dict[str, Tuple[torch.Tensor, torch.Tensor]]


def _vocab_parallel():
    from ..models.common import logprobs

    return logprobs.vocab_parallel_logprobs, logprobs.vocab_parallel_logprobs_and_entropy


def _tempered(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits / temperature, without a copy of the whole logits tensor at temperature 1."""
    return logits if temperature == 1.0 else logits / temperature


def response_logprobs(logits: torch.Tensor, micro_batch: MicroBatch, temperature: float,
                      tensor_group) -> torch.Tensor:
    """[B, L] log-probs of the response tokens under logits / temperature, the vocabulary sharded over
    `tensor_group` (ParallelDims.tensor_group; None: not sharded)."""
    logprobs_fn, _ = _vocab_parallel()
    return micro_batch.response_view(logprobs_fn(_tempered(logits, temperature), micro_batch.labels,
                                                 group=tensor_group))


def response_logprobs_and_entropy(logits: torch.Tensor, micro_batch: MicroBatch, temperature: float,
                                  tensor_group) -> Tuple[torch.Tensor, torch.Tensor]:
    """([B, L] log-probs, [B, L] entropy) of the response positions, from one set of passes over the logits."""
    _, both_fn = _vocab_parallel()
    logprobs, entropy = both_fn(_tempered(logits, temperature), micro_batch.labels, group=tensor_group)
    return micro_batch.response_view(logprobs), micro_batch.response_view(entropy)


def _masked_stat(values: torch.Tensor, mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    return (values.detach() * mask).sum(), mask.sum()


@dataclass
class Normaliser:
    """Mini-batch totals over all data-parallel ranks, scaled so DDP's gradient averaging yields the global mean."""

    tokens: float
    sequences: float


def actor_loss(logits: torch.Tensor, micro_batch: MicroBatch, config: AlgorithmConfig, temperature: float,
               normaliser: Normaliser, tensor_group) -> Tuple[torch.Tensor, Stats]:
    """The policy loss (with KL and entropy terms as configured); `tensor_group` as response_logprobs'."""
    mask = micro_batch.mask
    logprobs, entropy = response_logprobs_and_entropy(logits, micro_batch, temperature, tensor_group)
    on_policy = "old_logprobs" not in micro_batch.samples[0].tensors  # the trainer skipped that pass (loop.py)
    old_logprobs = logprobs.detach() if on_policy else micro_batch.stacked("old_logprobs")
    advantages = micro_batch.stacked("advantages")
    policy = algorithms.policy_loss(config.policy_loss).compute(logprobs, old_logprobs, advantages, mask, config)
    per_token = policy.per_token_loss
    if config.tis_cap is not None:
        per_token = per_token * algorithms.truncated_importance_weights(
            old_logprobs, micro_batch.stacked("rollout_logprobs"), config.tis_cap)

    def aggregate(values):
        return algorithms.aggregate_loss(values, mask, config.loss_agg, normaliser.tokens, normaliser.sequences)

    loss = aggregate(per_token)
    tokens = mask.sum()
    stats: Stats = {"loss/policy": _masked_stat(per_token, mask),
                    "actor/clip_fraction": (policy.clip_fraction * tokens, tokens),
                    "actor/approx_kl": (policy.approx_kl * tokens, tokens)}
    if on_policy:  # what the skipped pass would have stored (the roles keep it: ModelRole.train_step's keep)
        stats["old_logprobs"] = logprobs.detach()
    if config.kl_coef > 0 and "ref_logprobs" in micro_batch.samples[0].tensors:
        kl = algorithms.kl_penalty(logprobs, micro_batch.stacked("ref_logprobs"), config.kl_estimator)
        stats["kl/mean"] = _masked_stat(kl, mask)
        if not config.kl_in_reward:
            loss = loss + config.kl_coef * aggregate(kl)
    if config.entropy_coef > 0:
        loss = loss + aggregate(algorithms.entropy_bonus_loss(entropy, config.entropy_coef))
    stats["actor/entropy"] = _masked_stat(entropy, mask)
    return loss, stats


def critic_loss(values: torch.Tensor, micro_batch: MicroBatch, value_clip, normaliser: Normaliser,
                loss_agg: str) -> Tuple[torch.Tensor, Stats]:
    mask = micro_batch.mask
    predicted = micro_batch.response_view(values.float())
    returns = micro_batch.stacked("returns")
    per_token = algorithms.clipped_value_loss(predicted, micro_batch.stacked("old_values"), returns, mask, value_clip)
    loss = algorithms.aggregate_loss(per_token, mask, loss_agg, normaliser.tokens, normaliser.sequences)
    return loss, {"critic/value_loss": _masked_stat(per_token, mask)}


def supervised_loss(logits: torch.Tensor, micro_batch: MicroBatch, normaliser: Normaliser,
                    tensor_group) -> Tuple[torch.Tensor, Stats]:
    """Negative log-likelihood of the response tokens (the warm-up on ground-truth answers)."""
    logprobs = response_logprobs(logits, micro_batch, 1.0, tensor_group)
    loss = algorithms.aggregate_loss(-logprobs, micro_batch.mask, "token_mean", normaliser.tokens)
    return loss, {"loss/sft": _masked_stat(-logprobs, micro_batch.mask)}

"""Differential tests: our estimators and losses against verl 0.9.1's own core_algos, run unmodified, on random
inputs. Agreement is to 1e-6 (float32, values of order 1) except where docs/verl_differences.md names a
deliberate difference; those cases are asserted here as differences.

verl is not a dependency: its package pins transformers < 5.11 and pulls ray[default], so the README's install
command adds it with --no-deps (its core_algos need only ray, tensordict and codetiming, in the test extra).
The tests skip where it is missing, except in CI (CI=true), where that is a failure.
"""
import os

import numpy as np
import pytest
import torch

from mmrl_megatron import algorithms
from mmrl_megatron.models.common.logprobs import vocab_parallel_entropy

if os.environ.get("CI") == "true":
    from verl.trainer.ppo import core_algos
else:
    core_algos = pytest.importorskip("verl.trainer.ppo.core_algos", reason="verl 0.9.1 not installed (see docstring)")
from verl.trainer.config import AlgoConfig  # noqa: E402  (verl is there once core_algos imported)
from verl.utils import torch_functional as verl_functional  # noqa: E402
from verl.workers.config import ActorConfig  # noqa: E402

TOLERANCE = 1e-6
BATCH, LENGTH, GROUP = 12, 9, 4


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _mask_with_gaps(seed: int) -> torch.Tensor:
    """Response masks with trailing padding and, in some rows, a masked-out span inside (tool output)."""
    generator = _generator(seed)
    mask = torch.zeros(BATCH, LENGTH)
    for row in range(BATCH):
        length = int(torch.randint(3, LENGTH + 1, (1,), generator=generator))
        mask[row, :length] = 1.0
        if row % 3 == 0 and length > 4:
            mask[row, 1:3] = 0.0
    return mask


def _close(mine: torch.Tensor, theirs: torch.Tensor) -> bool:
    return torch.allclose(mine.double(), theirs.double(), atol=TOLERANCE, rtol=TOLERANCE)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_estimators_match_verl(estimator):
    """Invariant: k1, k2 and k3 equal verl's kl_penalty_forward, including log-ratios far outside [-20, 20] and
    -inf log-probs where verl clamps."""
    logprobs = torch.randn(BATCH, LENGTH, generator=_generator(0)) * 3
    ref = torch.randn(BATCH, LENGTH, generator=_generator(1)) * 3
    logprobs[0, :4] = torch.tensor([-1e4, -100.0, float("-inf"), 50.0])
    finite = torch.isfinite(logprobs) if estimator != "k3" else torch.ones_like(logprobs, dtype=torch.bool)
    mine = algorithms.kl_penalty(logprobs, ref, estimator)
    theirs = core_algos.kl_penalty_forward(logprobs, ref, estimator)
    assert _close(mine[finite], theirs[finite])


@pytest.mark.parametrize("normalize_by_std", [True, False])
def test_grpo_matches_verl(normalize_by_std):
    """Invariant: GRPO advantages equal verl's compute_grpo_outcome_advantage on groups of distinct rewards."""
    scores = torch.randn(BATCH, generator=_generator(2)) * 2
    mask = _mask_with_gaps(3)
    index = np.repeat(np.arange(BATCH // GROUP), GROUP)
    theirs, _ = core_algos.compute_grpo_outcome_advantage(
        algorithms.outcome_to_token_rewards(scores, mask), mask, index, norm_adv_by_std_in_grpo=normalize_by_std)
    mine = algorithms.grpo_advantages(scores, GROUP, normalize_by_std)
    assert _close(mine[:, None] * mask, theirs)


def test_grpo_equal_rewards_differ_from_verl_on_purpose():
    """Invariant (documented difference): a group of equal rewards gets exactly 0 here; verl's float32 mean is one
    ulp off for rewards like 2.1, so its (r - mean) / (std + 1e-6) is far from 0."""
    group = 8
    scores = torch.full((group,), 2.1)
    theirs, _ = core_algos.compute_grpo_outcome_advantage(scores[:, None], torch.ones(group, 1),
                                                          np.zeros(group, dtype=int))
    assert torch.equal(algorithms.grpo_advantages(scores, group), torch.zeros(group))
    assert theirs.abs().max() > 1e-3


def test_rloo_matches_verl():
    """Invariant: RLOO advantages equal verl's compute_rloo_outcome_advantage."""
    scores = torch.randn(BATCH, generator=_generator(4))
    mask = _mask_with_gaps(5)
    index = np.repeat(np.arange(BATCH // GROUP), GROUP)
    theirs, _ = core_algos.compute_rloo_outcome_advantage(algorithms.outcome_to_token_rewards(scores, mask), mask,
                                                          index)
    assert _close(algorithms.rloo_advantages(scores, GROUP)[:, None] * mask, theirs)


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_reinforce_plus_plus_matches_verl_across_masked_gaps(gamma):
    """Invariant: REINFORCE++ advantages (returns carried across masked spans, whitened with the unbiased std)
    equal verl's compute_reinforce_plus_plus_outcome_advantage on masks with gaps."""
    mask = _mask_with_gaps(6)
    token_rewards = torch.randn(BATCH, LENGTH, generator=_generator(7)) * mask
    theirs, their_returns = core_algos.compute_reinforce_plus_plus_outcome_advantage(
        token_rewards, mask, config=AlgoConfig(gamma=gamma))
    assert _close(algorithms.discounted_returns(token_rewards, mask, gamma), their_returns)
    assert _close(algorithms.reinforce_plus_plus_advantages(token_rewards, mask, gamma), theirs)


def test_gae_matches_verl_on_response_tokens():
    """Invariant: GAE advantages and returns equal verl's compute_gae_advantage_return on every response token
    (verl leaves running values on masked positions; ours are 0 there)."""
    mask = _mask_with_gaps(8)
    token_rewards = torch.randn(BATCH, LENGTH, generator=_generator(9)) * mask
    values = torch.randn(BATCH, LENGTH, generator=_generator(10))
    theirs, their_returns = core_algos.compute_gae_advantage_return(token_rewards, values, mask, 0.95, 0.9)
    mine, returns = algorithms.gae_advantages(token_rewards, values, mask, 0.95, 0.9)
    real = mask > 0
    assert _close(mine[real], theirs[real]) and _close(returns[real], their_returns[real])


def _policy_inputs(seed: int):
    old = torch.randn(BATCH, LENGTH, generator=_generator(seed)) - 2
    new = (old + 0.4 * torch.randn(BATCH, LENGTH, generator=_generator(seed + 1))).requires_grad_()
    advantages = torch.randn(BATCH, LENGTH, generator=_generator(seed + 2))
    return old, new, advantages, _mask_with_gaps(seed + 3)


def _actor_config(**clipping) -> ActorConfig:
    return ActorConfig(strategy="fsdp", rollout_n=GROUP, ppo_micro_batch_size_per_gpu=1, **clipping)


def _loss_and_gradient(loss_function):
    old, new, advantages, mask = _policy_inputs(11)
    loss, clip_fraction = loss_function(old, new, advantages, mask)
    (gradient,) = torch.autograd.grad(loss, new)
    return loss, clip_fraction, gradient


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_sum", "seq_mean_token_mean"])
def test_ppo_clip_loss_matches_verl(mode):
    """Invariant: PPO's clipped loss with clip-higher and dual clip 3, aggregated by each mode, its gradient and
    clip fraction equal verl's compute_policy_loss_vanilla."""
    config = _actor_config(clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0)

    def ours(old, new, advantages, mask):
        out = algorithms.ppo_clip_loss(new, old, advantages, mask, 0.2, 0.28, dual_clip=3.0)
        return algorithms.aggregate_loss(out.per_token_loss, mask, mode), out.clip_fraction

    def verl(old, new, advantages, mask):
        loss, metrics = core_algos.compute_policy_loss_vanilla(old, new, advantages, mask, mode.replace("_", "-"),
                                                               config)
        return loss, torch.tensor(metrics["actor/pg_clipfrac"])

    mine, theirs = _loss_and_gradient(ours), _loss_and_gradient(verl)
    assert all(_close(a, b) for a, b in zip(mine, theirs))


def test_gspo_loss_matches_verl():
    """Invariant: GSPO's sequence-ratio loss (token_mean) and its gradient equal verl's compute_policy_loss_gspo."""
    config = _actor_config(clip_ratio_low=3e-4, clip_ratio_high=4e-4)

    def ours(old, new, advantages, mask):
        out = algorithms.gspo_loss(new, old, advantages, mask, 3e-4, 4e-4)
        return algorithms.aggregate_loss(out.per_token_loss, mask), out.clip_fraction

    def verl(old, new, advantages, mask):
        loss, metrics = core_algos.compute_policy_loss_gspo(old, new, advantages, mask, "token-mean", config)
        return loss, torch.tensor(metrics["actor/pg_clipfrac"])

    mine, theirs = _loss_and_gradient(ours), _loss_and_gradient(verl)
    assert all(_close(a, b) for a, b in zip(mine, theirs))


def test_value_loss_matches_verl():
    """Invariant: the clipped value loss, token-mean aggregated, equals verl's compute_value_loss."""
    mask = _mask_with_gaps(15)
    values, old_values, returns = (torch.randn(BATCH, LENGTH, generator=_generator(seed)) for seed in (16, 17, 18))
    theirs, _ = core_algos.compute_value_loss(values, returns, old_values, mask, cliprange_value=0.3)
    mine = algorithms.aggregate_loss(algorithms.clipped_value_loss(values, old_values, returns, mask, 0.3), mask)
    assert _close(mine, theirs)


def test_entropy_matches_verl():
    """Invariant: the chunked entropy equals verl's entropy_from_logits (both in float64, ordinary logits)."""
    logits = torch.randn(BATCH, LENGTH, 50, generator=_generator(19), dtype=torch.float64) * 4
    theirs = verl_functional.entropy_from_logits(logits)
    assert _close(vocab_parallel_entropy(logits, chunk_tokens=7), theirs)

"""Policy, value, KL and aggregation functions pinned to hand-computed values."""
import math

import pytest
import torch

from mmrl_megatron.algorithms import (aggregate_loss, clipped_value_loss, entropy_bonus_loss, explained_variance,
                                      groups_with_reward_variance, gspo_loss, kl_penalised_rewards, kl_penalty,
                                      overlong_reward_penalty, ppo_clip_loss, truncated_importance_weights)

LOG = math.log


def test_ppo_clip_asymmetric_bounds():
    """Invariant: positive advantages are clipped at 1+clip_high, negative at 1-clip_low (DAPO clip-higher)."""
    old = torch.zeros(1, 4)
    new = torch.tensor([[LOG(1.5), LOG(1.1), LOG(0.5), LOG(0.9)]])
    advantages = torch.tensor([[1.0, 1.0, -1.0, -1.0]])
    out = ppo_clip_loss(new, old, advantages, torch.ones(1, 4), clip_low=0.2, clip_high=0.28)
    # 1.5 -> clipped to 1.28; 1.1 inside; 0.5 with A<0 -> max(0.5, 0.8) = 0.8; 0.9 inside
    assert torch.allclose(out.per_token_loss, torch.tensor([[-1.28, -1.1, 0.8, 0.9]]), atol=1e-6)
    assert out.clip_fraction.item() == pytest.approx(0.5)


def test_ppo_dual_clip_caps_negative_advantage_loss():
    """Invariant: with dual clip c, a negative-advantage token's loss never exceeds c * |A|."""
    new = torch.tensor([[LOG(5.0), LOG(5.0)]])
    advantages = torch.tensor([[-1.0, 1.0]])
    out = ppo_clip_loss(new, torch.zeros(1, 2), advantages, torch.ones(1, 2), dual_clip=3.0)
    assert torch.allclose(out.per_token_loss, torch.tensor([[3.0, -1.2]]), atol=1e-6)


def test_ppo_gradient_is_zero_on_clipped_tokens():
    """Invariant: a token clipped on the advantage's side carries no gradient; an unclipped one does."""
    new = torch.tensor([[LOG(1.5), LOG(1.0)]], requires_grad=True)
    out = ppo_clip_loss(new, torch.zeros(1, 2), torch.ones(1, 2), torch.ones(1, 2))
    out.per_token_loss.sum().backward()
    assert new.grad[0, 0].item() == 0.0 and new.grad[0, 1].item() == pytest.approx(-1.0)


def test_gspo_uses_sequence_geometric_mean_ratio():
    """Invariant: GSPO's ratio is exp(mean log-ratio of the sequence), shared by all its tokens."""
    new = torch.tensor([[LOG(2.0), LOG(0.5), 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    out = gspo_loss(new, torch.zeros(1, 3), torch.ones(1, 3), mask, clip_low=0.2, clip_high=0.2)
    # mean log ratio 0 -> ratio 1 on both real tokens, padding contributes nothing
    assert torch.allclose(out.per_token_loss, torch.tensor([[-1.0, -1.0, 0.0]]), atol=1e-6)
    assert out.ratio_mean.item() == pytest.approx(1.0)


def test_loss_aggregation_modes():
    """Invariant: token_mean, seq_mean_token_sum and seq_mean_token_mean follow their definitions."""
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert aggregate_loss(loss, mask, "token_mean").item() == pytest.approx(10 / 4)
    assert aggregate_loss(loss, mask, "seq_mean_token_sum").item() == pytest.approx((6 + 4) / 2)
    assert aggregate_loss(loss, mask, "seq_mean_token_mean").item() == pytest.approx((2 + 4) / 2)
    # a micro-batch normalised by mini-batch totals: halves sum to the whole
    halves = [aggregate_loss(loss[i:i + 1], mask[i:i + 1], "token_mean", token_count=4) for i in range(2)]
    assert sum(halves).item() == pytest.approx(10 / 4)
    with pytest.raises(ValueError, match="token_mean"):
        aggregate_loss(loss, mask, "bogus")


def test_kl_estimators():
    """Invariant: k1 = d, k2 = d^2/2, k3 = exp(-d) + d - 1 for d = log p - log q."""
    d = 0.5
    logp, ref = torch.tensor([d]), torch.tensor([0.0])
    assert kl_penalty(logp, ref, "k1").item() == pytest.approx(d)
    assert kl_penalty(logp, ref, "k2").item() == pytest.approx(d * d / 2)
    assert kl_penalty(logp, ref, "k3").item() == pytest.approx(math.exp(-d) + d - 1)
    assert kl_penalty(torch.tensor([-30.0]), ref, "k3").item() == 10.0  # bounded
    penalised = kl_penalised_rewards(torch.tensor([[1.0, 0.0]]), torch.tensor([[d, d]]), torch.zeros(1, 2),
                                     torch.tensor([[1.0, 0.0]]), coefficient=0.1, estimator="k1")
    assert torch.allclose(penalised, torch.tensor([[1.0 - 0.05, 0.0]]))


def test_k3_is_finite_for_extreme_and_infinite_log_ratios():
    """Invariant: k3's value stays in [0, 10] and its gradient finite when ref - logp reaches 1e4 (exp would
    overflow float32 past ~88.7) or a log-prob is -inf, as in verl, which clamps the log-ratio before exp."""
    logprobs = torch.tensor([-1e4, -100.0, -89.0, 0.0, float("-inf"), -2.0], requires_grad=True)
    ref = torch.tensor([0.0, 0.0, 0.0, -1e4, 0.0, float("-inf")])
    kl = kl_penalty(logprobs, ref, "k3")
    assert torch.equal(kl, torch.full((6,), 10.0))
    kl.sum().backward()
    assert torch.isfinite(logprobs.grad).all()


def test_k3_keeps_the_logit_gradient_finite():
    """Invariant: one token whose log-prob is 1e4 below the reference's, in a kl_coef 0.01 loss, leaves every
    logit's gradient finite (before the clamp exp overflowed and 0 * inf made the whole gradient NaN)."""
    logits = torch.randn(2, 4, 16, generator=torch.Generator().manual_seed(0), requires_grad=True)
    labels = torch.zeros(2, 4, dtype=torch.long)
    logprobs = torch.log_softmax(logits, -1).gather(-1, labels[..., None]).squeeze(-1)
    ref = logprobs.detach() + 0.3
    ref[0, 1] += 1e4
    ref[1, 2] += 95.0
    loss = 0.01 * kl_penalty(logprobs, ref, "k3").mean()
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    assert logits.grad.abs().sum() > 0  # the ordinary tokens still pull towards the reference


def test_entropy_bonus_and_truncated_importance_sampling():
    """Invariant: the entropy term is -coef * H; TIS weights are min(pi_train/pi_rollout, cap), no gradient."""
    assert entropy_bonus_loss(torch.tensor([2.0]), 0.01).item() == pytest.approx(-0.02)
    trainer = torch.tensor([LOG(0.5), LOG(0.9)], requires_grad=True)
    weights = truncated_importance_weights(trainer, torch.tensor([LOG(0.25), LOG(0.9)]), cap=1.5)
    assert torch.allclose(weights, torch.tensor([1.5, 1.0])) and not weights.requires_grad


def test_clipped_value_loss_and_explained_variance():
    """Invariant: value loss = 0.5 max((V-R)^2, (clip(V)-R)^2); explained variance 1 for a perfect critic."""
    values, old, returns = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    loss = clipped_value_loss(values, old, returns, torch.ones(1, 2), clip=0.2)
    # token 0: unclipped 1, clipped (0.2-0)^2 -> max 1; token 1: (0-1)^2 = 1 both
    assert torch.allclose(loss, torch.tensor([[0.5, 0.5]]))
    returns = torch.tensor([[1.0, 2.0, 3.0]])
    assert explained_variance(returns, returns, torch.ones(1, 3)).item() == pytest.approx(1.0)
    assert explained_variance(torch.full((1, 3), 2.0), returns, torch.ones(1, 3)).item() == pytest.approx(0.0)


def test_dapo_dynamic_sampling_and_overlong_penalty():
    """Invariant: zero-variance groups are dropped; the overlong penalty ramps from 0 to -penalty over the buffer."""
    keep = groups_with_reward_variance(torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0]), group_size=2)
    assert keep.tolist() == [False, True, False]
    penalty = overlong_reward_penalty(torch.tensor([10, 15, 20, 25]), max_length=20, buffer=10, penalty=2.0)
    assert torch.allclose(penalty, torch.tensor([0.0, -1.0, -2.0, -2.0]))

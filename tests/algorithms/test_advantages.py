"""Advantage estimators pinned to hand-computed values."""
import math

import pytest
import torch

from mmrl_megatron.algorithms import (discounted_returns, gae_advantages, grpo_advantages, outcome_to_token_rewards,
                                      reinforce_plus_plus_advantages, rloo_advantages)


def test_grpo_normalises_within_each_group():
    """Invariant: GRPO advantage = (r - group mean) / (unbiased group std + eps), groups independent."""
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0])
    advantages = grpo_advantages(rewards, group_size=2, eps=0.0)
    std = math.sqrt(0.5)  # unbiased std of {1, 0}
    assert torch.allclose(advantages[:4], torch.tensor([0.5 / std, -0.5 / std, -0.5 / std, 0.5 / std]))
    assert torch.equal(advantages[4:], torch.zeros(2))  # equal rewards teach nothing


@pytest.mark.parametrize("value", [2.1, 0.1, 0.7, 3.3, -1.3])
@pytest.mark.parametrize("normalize_by_std", [True, False])
def test_grpo_equal_rewards_centre_to_exactly_zero(value, normalize_by_std):
    """Invariant: a group whose rewards are all equal gets advantage exactly 0 in float32 for any reward value
    (a float32 mean of 2.1s is one ulp off; divided by std + 1e-6 that was ~0.19 on every sample)."""
    alone = grpo_advantages(torch.full((8,), value), group_size=8, normalize_by_std=normalize_by_std)
    assert torch.equal(alone, torch.zeros(8))
    rewards = torch.tensor([value] * 8 + [0.0, 1.0] * 4, dtype=torch.float32)
    advantages = grpo_advantages(rewards, group_size=8, normalize_by_std=normalize_by_std)
    assert torch.equal(advantages[:8], torch.zeros(8))
    assert advantages[8:].abs().min() > 0.1  # the mixed group beside it still teaches


def test_grpo_without_std_only_centres():
    """Invariant: with normalize_by_std off the advantage is r minus its group mean (Dr. GRPO)."""
    advantages = grpo_advantages(torch.tensor([3.0, 1.0, 2.0]), group_size=3, normalize_by_std=False)
    assert torch.allclose(advantages, torch.tensor([1.0, -1.0, 0.0]))


def test_grpo_rejects_ragged_groups():
    """Invariant: a reward count that is not a multiple of the group size is an error, not a silent reshape."""
    with pytest.raises(ValueError, match="group_size=2"):
        grpo_advantages(torch.ones(3), group_size=2)


def test_rloo_subtracts_mean_of_the_others():
    """Invariant: RLOO advantage_i = r_i - mean(r_j, j != i) within the prompt's group."""
    advantages = rloo_advantages(torch.tensor([1.0, 0.0, 0.0]), group_size=3)
    assert torch.allclose(advantages, torch.tensor([1.0, -0.5, -0.5]))


def test_outcome_reward_sits_on_last_response_token():
    """Invariant: a scalar score lands on each row's last unmasked token and nowhere else."""
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.float32)
    token_rewards = outcome_to_token_rewards(torch.tensor([2.0, -1.0]), mask)
    assert torch.equal(token_rewards, torch.tensor([[0.0, 0.0, 2.0], [-1.0, 0.0, 0.0]]))
    # a multi-turn mask with an environment turn inside: the last generated token, not the count's position
    holes = torch.tensor([[1, 0, 0, 1, 1, 0], [1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]], dtype=torch.float32)
    token_rewards = outcome_to_token_rewards(torch.tensor([3.0, 4.0, 5.0]), holes)
    assert torch.equal(token_rewards, torch.tensor([[0.0, 0, 0, 0, 3, 0], [0, 4, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]]))


def test_reinforce_plus_plus_whitens_discounted_returns():
    """Invariant: REINFORCE++ = batch-whitened discounted returns over response tokens (unbiased std, as verl)."""
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    rewards = torch.tensor([[0.0, 1.0], [0.0, 0.0]])
    # gamma 0.5: returns [[0.5, 1.0], [0.0, -]]; mean 0.5, unbiased std sqrt(0.5 / 2)
    advantages = reinforce_plus_plus_advantages(rewards, mask, gamma=0.5)
    std = math.sqrt(((0.0) ** 2 + 0.5 ** 2 + 0.5 ** 2) / 2)
    assert torch.allclose(advantages, torch.tensor([[0.0, 0.5 / std], [-0.5 / std, 0.0]]), atol=1e-5)


def test_discounted_returns_carry_across_masked_gaps():
    """Invariant: masked positions inside a response (tool output in a multi-turn response) neither restart nor
    discount the return: G_t = r_t + gamma * G at the next unmasked position, and masked positions return 0."""
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0]])
    rewards = torch.tensor([[0.0, 0.0, 5.0, 0.0, 0.0, 1.0, 0.0]])  # the 5.0 sits on a masked token: ignored
    gamma = 0.5
    returns = discounted_returns(rewards, mask, gamma)
    # unmasked positions 0, 1, 4, 5 in order: returns 1 * gamma^3, gamma^2, gamma, 1
    assert torch.allclose(returns, torch.tensor([[gamma ** 3, gamma ** 2, 0.0, 0.0, gamma, 1.0, 0.0]]))
    advantages = reinforce_plus_plus_advantages(rewards, mask, gamma)
    assert torch.equal(advantages[mask == 0], torch.zeros(3)) and advantages[0, 0] < advantages[0, 1]


def test_gae_matches_hand_recursion():
    """Invariant: GAE follows delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lam A_{t+1},
    with V = 0 past the last response token, and returns = A + V."""
    rewards = torch.tensor([[0.0, 1.0, 0.0]])
    values = torch.tensor([[0.5, 0.25, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    gamma, lam = 0.9, 0.8
    delta1 = 1.0 - 0.25
    delta0 = 0.0 + gamma * 0.25 - 0.5
    a1 = delta1
    a0 = delta0 + gamma * lam * a1
    advantages, returns = gae_advantages(rewards, values, mask, gamma, lam, whiten_advantages=False)
    assert torch.allclose(advantages, torch.tensor([[a0, a1, 0.0]]))
    assert torch.allclose(returns, torch.tensor([[a0 + 0.5, a1 + 0.25, 0.0]]))

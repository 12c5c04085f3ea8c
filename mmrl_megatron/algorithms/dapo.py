"""DAPO's data-side tricks: dynamic sampling (keep only groups that teach something) and overlong shaping."""
import torch


def groups_with_reward_variance(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Bool [num_groups]: True where a prompt's n rewards are not all equal (zero-variance groups give
    zero GRPO advantage, so they only dilute the batch)."""
    groups = rewards.view(-1, group_size)
    return (groups.max(dim=1).values - groups.min(dim=1).values) > 0


def overlong_reward_penalty(response_lengths: torch.Tensor, max_length: int, buffer: int,
                            penalty: float = 1.0) -> torch.Tensor:
    """DAPO soft overlong punishment added to the reward: 0 up to max_length - buffer, then falling
    linearly to -penalty at max_length (and -penalty beyond)."""
    if buffer <= 0:
        return torch.zeros_like(response_lengths, dtype=torch.float32)
    start = max_length - buffer
    excess = (response_lengths.float() - start).clamp(min=0) / buffer
    return -penalty * excess.clamp(max=1.0)

"""Kimi-VL's position ids: 0..P+R-1 (image tokens count one each), in M-RoPE's [3, L] shape. The model
ignores them because megatron's MLA numbers each packed sequence from 0 itself, as generation does."""
from typing import List, Sequence

import torch

from ..family import PositionRule


def position_rule(kimi) -> PositionRule:
    def positions(prompt_ids: List[int], response_length: int, image_grid_thw,
                  second_per_grid_ts: Sequence[float] = ()) -> torch.Tensor:
        return torch.arange(len(prompt_ids) + response_length).expand(3, -1).clone()

    return positions

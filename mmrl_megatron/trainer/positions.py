"""Positions of a multi-turn trajectory, from its family's position rule (models.family.position_rule):
the prompt and each environment turn placed in turn, as HF's get_rope_index places a whole conversation."""
from typing import List, Sequence

import torch

from ..models.family import PositionRule


def trajectory_positions(rule: PositionRule, prompt_ids: List[int], prompt_grid, turns,
                         second_per_grid_ts: Sequence[float] = ()) -> torch.Tensor:
    """[3, P + R] positions of a multi-turn trajectory (turns: its rollout.multi_turn.TurnRecord).

    Each part the model was given (the prompt, then each environment turn) is placed by the family's rule with
    the assistant turn after it as generated text, and starts one past the largest position before it: HF's
    get_rope_index continues every text or image span from the previous maximum + 1, so for Qwen2.5-VL this is
    its positions of the whole conversation, every image included (Kimi-VL: 0..P+R-1). Videos come only
    with the prompt (environment turns return images), so second_per_grid_ts belongs to the first part."""
    pieces, offset = [], 0
    for index, (ids, grid, generated) in enumerate(turns.given_parts(prompt_ids, prompt_grid)):
        piece = rule(ids, generated, grid, second_per_grid_ts if index == 0 else ()) + offset
        pieces.append(piece)
        offset = int(piece.max()) + 1
    return torch.cat(pieces, dim=1)

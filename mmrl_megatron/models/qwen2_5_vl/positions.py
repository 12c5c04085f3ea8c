"""Qwen2.5-VL's position ids as the model scores them: M-RoPE, transformers' get_rope_index for the prompt
(models/common/rope.py), one position per token after it for the response, as generation places them."""
from typing import List, Sequence

import torch

from ..common.rope import rope_positions, with_response_positions
from ..family import PositionRule
from .hf_config import Qwen25VLShape


def position_rule(shape: Qwen25VLShape) -> PositionRule:
    vision = shape.vision

    def positions(prompt_ids: List[int], response_length: int, image_grid_thw,
                  second_per_grid_ts: Sequence[float] = ()) -> torch.Tensor:
        prompt = rope_positions(torch.tensor(prompt_ids), image_grid_thw, vision.spatial_merge_size,
                                shape.image_token_id, shape.vision_start_token_id, shape.video_token_id,
                                second_per_grid_ts, vision.tokens_per_second)
        return with_response_positions(prompt, response_length)

    return positions

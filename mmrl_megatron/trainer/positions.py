"""Position ids of a prompt + response sequence as the model scores it, per model family.

A rule is (prompt ids, response length, image_grid_thw, second_per_grid_ts=()) -> [3, P + R]: the prompt's
positions as the family's HF implementation computes them, the response's as generation places them.
image_grid_thw has a row per image or video in prompt order, second_per_grid_ts an entry per video.
"""
from typing import Callable, List, Mapping, Sequence

import torch

from ..models import family_of
from ..models.errors import ModelError

PositionRule = Callable[..., torch.Tensor]
QWEN_TOKENS_PER_SECOND = 4  # transformers' Qwen2_5_VLVisionConfig default, for a config.json without the key


def _qwen2_5_vl(hf_config: Mapping) -> PositionRule:
    """M-RoPE: transformers' get_rope_index for the prompt (data.rope_positions)."""
    from ..data.rope import rope_positions, with_response_positions

    vision = hf_config.get("vision_config", {})
    merge = vision.get("spatial_merge_size", 2)
    tokens_per_second = vision.get("tokens_per_second", QWEN_TOKENS_PER_SECOND)
    image_token, vision_start = hf_config["image_token_id"], hf_config["vision_start_token_id"]
    video_token = hf_config.get("video_token_id")

    def positions(prompt_ids: List[int], response_length: int, image_grid_thw,
                  second_per_grid_ts: Sequence[float] = ()) -> torch.Tensor:
        prompt = rope_positions(torch.tensor(prompt_ids), image_grid_thw, merge, image_token, vision_start,
                                video_token, second_per_grid_ts, tokens_per_second)
        return with_response_positions(prompt, response_length)

    return positions


def _kimi_vl(hf_config: Mapping) -> PositionRule:
    """1-D positions 0..P+R-1 (image tokens count one each), in M-RoPE's [3, L] shape; KimiVLModel
    ignores them because megatron's MLA numbers each packed sequence from 0 itself, as generation does."""

    def positions(prompt_ids: List[int], response_length: int, image_grid_thw,
                  second_per_grid_ts: Sequence[float] = ()) -> torch.Tensor:
        return torch.arange(len(prompt_ids) + response_length).expand(3, -1).clone()

    return positions


RULES = {"qwen2_5_vl": _qwen2_5_vl, "kimi_vl": _kimi_vl}


def position_rule(hf_config: Mapping, model_config=None) -> PositionRule:
    family = family_of(model_config, hf_config)
    if family not in RULES:
        raise ModelError(f"no position rule for model_type {family!r}; known: {sorted(RULES)}")
    return RULES[family](hf_config)


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

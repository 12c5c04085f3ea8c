"""Prepared prompts (ids, rotary positions, images) and batches of them for one prefill.

Families prepare their own prompts (qwen2_5_vl.py: M-RoPE positions; kimi_vl.py: 1-D positions) with
the checks here, so that every family reports a malformed request the same way.
"""
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

from ..errors import RolloutError
from ..types import RolloutRequest


@dataclass
class PreparedPrompt:
    request_index: int
    input_ids: torch.Tensor  # [L] long, CPU
    positions: torch.Tensor  # [position rows, L] rotary positions (3 rows for M-RoPE), CPU
    rope_delta: int  # next position = next index + rope_delta
    pixel_values: Optional[torch.Tensor]
    image_grid_thw: Optional[torch.Tensor]

    @property
    def length(self) -> int:
        return int(self.input_ids.numel())


def prompt_ids(request: RolloutRequest, request_index: int) -> torch.Tensor:
    """The request's prompt ids as a 1-D long tensor; raises RolloutError for an empty prompt."""
    input_ids = torch.as_tensor(request.prompt_ids, dtype=torch.long).flatten()
    if input_ids.numel() == 0:
        raise RolloutError(f"request {request_index} has an empty prompt_ids")
    return input_ids


def check_image_placeholders(request: RolloutRequest, request_index: int, found: int, expected: int,
                             placeholder: str, expansion: str) -> None:
    """Raise RolloutError unless the prompt holds exactly the `expected` placeholder tokens its images need
    (and images come with pixel_values exactly when it holds any); `expansion` says how to expand them."""
    if found != expected or (expected > 0) != (request.pixel_values is not None):
        raise RolloutError(f"request {request_index} has {found} {placeholder} tokens but its image_grid_thw implies "
                           f"{expected} (pixel_values given: {request.pixel_values is not None}): {expansion}")


@dataclass
class PrefillBatch:
    input_ids: torch.Tensor  # [B, T] right-padded
    positions: torch.Tensor  # [position rows, B, T]
    lengths: torch.Tensor  # [B]
    pixel_values: Optional[torch.Tensor]
    image_grid_thw: Optional[torch.Tensor]


def collate_prefill(prompts: Sequence[PreparedPrompt], device: torch.device, pixel_dtype: torch.dtype) -> PrefillBatch:
    """Right-pad prompts into one batch; images are concatenated in prompt order, as the pads appear."""
    length = max(prompt.length for prompt in prompts)
    input_ids = torch.zeros(len(prompts), length, dtype=torch.long)
    positions = torch.zeros(prompts[0].positions.shape[0], len(prompts), length, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, :prompt.length] = prompt.input_ids
        positions[:, row, :prompt.length] = prompt.positions
    with_images: List[PreparedPrompt] = [prompt for prompt in prompts if prompt.pixel_values is not None]
    pixel_values = grid = None
    if with_images:
        pixel_values = torch.cat([prompt.pixel_values for prompt in with_images]).to(device, pixel_dtype)
        grid = torch.cat([prompt.image_grid_thw for prompt in with_images]).to(device, torch.long)
    lengths = torch.tensor([prompt.length for prompt in prompts], dtype=torch.long)
    return PrefillBatch(input_ids.to(device), positions.to(device), lengths.to(device), pixel_values, grid)

"""Requests -> validated prompts with M-RoPE positions, and batches of them for one prefill."""
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

from ...data.rope import rope_positions
from ..errors import RolloutError
from ..types import RolloutRequest


@dataclass
class PreparedPrompt:
    request_index: int
    input_ids: torch.Tensor  # [L] long, CPU
    positions: torch.Tensor  # [3, L] M-RoPE positions (HF get_rope_index), CPU
    rope_delta: int  # next position = next index + rope_delta
    pixel_values: Optional[torch.Tensor]
    image_grid_thw: Optional[torch.Tensor]

    @property
    def length(self) -> int:
        return int(self.input_ids.numel())


def prepare_prompt(model: torch.nn.Module, request: RolloutRequest, request_index: int) -> PreparedPrompt:
    """Check that the image pads match the images and compute M-RoPE positions.

    Positions come from data.rope_positions, the function the trainer scores with (equal to HF's
    get_rope_index, whose signature differs between transformers 5 releases).
    """
    config = model.config
    input_ids = torch.as_tensor(request.prompt_ids, dtype=torch.long).flatten()
    if input_ids.numel() == 0:
        raise RolloutError(f"request {request_index} has an empty prompt_ids")
    image_tokens = input_ids == config.image_token_id
    grid = request.image_grid_thw
    expected = 0 if grid is None else int((grid.prod(-1) // config.vision_config.spatial_merge_size ** 2).sum())
    if int(image_tokens.sum()) != expected or (expected > 0) != (request.pixel_values is not None):
        raise RolloutError(f"request {request_index} has {int(image_tokens.sum())} <|image_pad|> tokens but its "
                           f"image_grid_thw implies {expected} (pixel_values given: {request.pixel_values is not None}):"
                           " expand each image pad to grid_t*grid_h*grid_w/merge_size**2 copies")
    try:
        positions = rope_positions(input_ids, grid, config.vision_config.spatial_merge_size, config.image_token_id,
                                   config.vision_start_token_id)
    except ValueError as error:
        raise RolloutError(f"request {request_index}: {error}") from error
    rope_delta = int(positions.max()) + 1 - input_ids.numel()
    return PreparedPrompt(request_index, input_ids, positions, rope_delta, request.pixel_values, grid)


@dataclass
class PrefillBatch:
    input_ids: torch.Tensor  # [B, T] right-padded
    positions: torch.Tensor  # [3, B, T]
    lengths: torch.Tensor  # [B]
    pixel_values: Optional[torch.Tensor]
    image_grid_thw: Optional[torch.Tensor]


def collate_prefill(prompts: Sequence[PreparedPrompt], device: torch.device, pixel_dtype: torch.dtype) -> PrefillBatch:
    """Right-pad prompts into one batch; images are concatenated in prompt order, as the pads appear."""
    length = max(prompt.length for prompt in prompts)
    input_ids = torch.zeros(len(prompts), length, dtype=torch.long)
    positions = torch.zeros(3, len(prompts), length, dtype=torch.long)
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

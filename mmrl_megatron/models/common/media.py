"""What a family's image and video processors return to the data path (data/processor.py), and the error
they raise for one unusable row (the data path counts it under `reason` and skips the row)."""
from dataclasses import dataclass
from typing import List

import torch


class SkippedRow(Exception):
    """One row that cannot be used; `reason` is the counter it is reported under, the message says why."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass
class ProcessedImages:
    """One prompt's images as a family's image processor returns them (models/<family>/images.py).

    pixel_values: every image's patches, image after image, in the layout the family's vision tower takes.
    image_grid_thw: [num_images, 3] LongTensor (t, h, w) in patches.
    tokens_per_image: how many copies of the image pad token stand for each image in the prompt.
    """
    pixel_values: torch.Tensor
    image_grid_thw: torch.Tensor
    tokens_per_image: List[int]


@dataclass
class ProcessedVideo:
    """One video as a family's video processor returns it (models/qwen2_5_vl/video.py).

    pixel_values: its patches, temporal patch after temporal patch, in the layout the vision tower takes.
    grid_thw: [1, 3] LongTensor (t, h, w) in patches; t counts temporal patches (frames / temporal_patch_size).
    tokens: how many copies of the video pad token stand for it in the prompt.
    second_per_grid_t: seconds of video per temporal patch (temporal_patch_size / sampled fps), which spaces
        its temporal M-RoPE positions.
    """
    pixel_values: torch.Tensor
    grid_thw: torch.Tensor
    tokens: int
    second_per_grid_t: float

"""Qwen3-VL's M-RoPE position ids (transformers' Qwen3VLModel.get_rope_index), and the scoring rule.

Text advances all three axes by one. Each run of image- or video-pad tokens is one image, or one video frame
(Qwen3-VL writes a timestamp before every frame, so a video's grid row of t temporal patches is t frames of
one temporal patch each): its tokens take (start, start + row, start + column) on the (t, h, w) axes, and text
resumes at start + max(h, w) / merge. Timing lives in the timestamp text, so second_per_grid_ts is unused.
"""
import itertools

import torch

from ..errors import ModelError
from .geometry import Qwen3VLGeometry


def _vision_grids(runs, image_grid_thw, geometry: Qwen3VLGeometry):
    """The (t, h, w) grid of every run of pad tokens: an image run takes the next grid row, a video's first
    frame run takes the next row and its t - 1 later frame runs repeat it with t = 1."""
    rows = iter([] if image_grid_thw is None else torch.as_tensor(image_grid_thw).view(-1, 3).tolist())
    frames_left, frame = 0, None
    for token, _ in runs:
        if frames_left:
            frames_left -= 1
            yield frame
            continue
        row = next(rows, None)
        if row is None:
            raise ModelError("the prompt holds more images/video frames than image_grid_thw has rows")
        if token == geometry.video_token_id:
            frames_left, frame = row[0] - 1, (1, row[1], row[2])
            yield frame
        else:
            yield tuple(row)
    if next(rows, None) is not None or frames_left:
        raise ModelError("image_grid_thw describes more images/video frames than the prompt holds")


def rope_positions(input_ids, image_grid_thw, geometry: Qwen3VLGeometry) -> torch.Tensor:
    """LongTensor[3, T] for one unpadded sequence; image_grid_thw [images + videos, 3] in prompt order."""
    ids = torch.as_tensor(input_ids).view(-1).tolist()
    merge = geometry.vision.spatial_merge_size
    pads = {geometry.image_token_id, geometry.video_token_id} - {None}
    runs = [(token, len(list(group))) for token, group in itertools.groupby(ids)]
    grids = _vision_grids([run for run in runs if run[0] in pads], image_grid_thw, geometry)
    pieces, position = [], 0
    for token, length in runs:
        if token not in pads:
            pieces.append(torch.arange(length).expand(3, length) + position)
            position += length
            continue
        t, h, w = next(grids)
        height, width = h // merge, w // merge
        if t * height * width != length:
            raise ModelError(f"a run of {length} image/video-pad tokens does not match its grid {t}x{h}x{w} "
                             f"({t * height * width} merged patches); check image_grid_thw against the prompt")
        frame, row, column = torch.meshgrid(torch.arange(t), torch.arange(height), torch.arange(width), indexing="ij")
        pieces.append(torch.stack([frame, row, column]).reshape(3, -1) + position)
        position += max(height, width)
    list(grids)  # raises when grid rows are left over
    return torch.cat(pieces, dim=1) if pieces else torch.zeros(3, 0, dtype=torch.long)


def position_rule(geometry: Qwen3VLGeometry):
    """(prompt ids, response length, image_grid_thw, second_per_grid_ts=()) -> [3, P + R]: the prompt's positions
    as transformers computes them, the response's continuing from their maximum + 1 as generation places them."""

    def positions(prompt_ids, response_length: int, image_grid_thw, second_per_grid_ts=()) -> torch.Tensor:
        prompt = rope_positions(prompt_ids, image_grid_thw, geometry)
        start = int(prompt.max()) + 1 if prompt.numel() else 0
        response = torch.arange(start, start + response_length).expand(3, -1)
        return torch.cat([prompt, response], dim=1)

    return positions

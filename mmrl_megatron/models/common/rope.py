"""M-RoPE position ids for Qwen2.5-VL sequences, computed without a model object.

Equal to transformers' `Qwen2_5_VLModel.get_rope_index` for images and videos (the tests compare them) from
transformers 5.18 on; earlier releases truncated a video's seconds per temporal patch to an integer first
(huggingface/transformers#48669: with 2 frames per temporal patch, a video sampled at more than 2 frames per
second got one temporal position for all its patches, and fractional spacings lost their fraction).
Written here because the trainer needs positions for packed sequences, one sequence at a time, without
instantiating the Hugging Face model or building `mm_token_type_ids`.
"""
from typing import Optional, Sequence

import torch


def _vision_starts(ids: torch.Tensor, pad_ids: Sequence[int], vision_start_token_id: int) -> torch.Tensor:
    """Token indices where an image's or video's pad tokens begin (each follows a vision-start token)."""
    follows_start = torch.zeros_like(ids, dtype=torch.bool)
    follows_start[1:] = ids[:-1] == vision_start_token_id
    return torch.nonzero(follows_start & torch.isin(ids, torch.tensor(pad_ids))).view(-1)


def rope_positions(input_ids, image_grid_thw, spatial_merge_size: int, image_token_id: int,
                   vision_start_token_id: int, video_token_id: Optional[int] = None,
                   second_per_grid_ts: Sequence[float] = (), tokens_per_second: Optional[float] = None) -> torch.Tensor:
    """LongTensor[3, T] (temporal, height, width) positions for one unpadded sequence of T tokens.

    Text tokens advance all three rows by one; the tokens of image or video i (grid_t*grid_h*grid_w / merge^2
    copies of its pad token after a vision-start token) take their grid coordinates offset by the running
    position, after which text resumes at that position + max(grid_h, grid_w) / merge. A video's temporal
    coordinate k becomes int(k * tokens_per_second * its second_per_grid_t), in float32 as transformers
    computes it. `image_grid_thw` is [images + videos, 3] in patches, in the order they appear;
    `second_per_grid_ts` has one entry per video, in order; `tokens_per_second` is vision_config's.
    """
    ids = torch.as_tensor(input_ids).view(-1)
    length = ids.numel()
    pads = [image_token_id] + ([] if video_token_id is None else [video_token_id])
    starts = _vision_starts(ids, pads, vision_start_token_id).tolist()
    grids = [] if image_grid_thw is None else torch.as_tensor(image_grid_thw).view(-1, 3).tolist()
    if len(starts) != len(grids):
        raise ValueError(f"{len(starts)} images/videos in the token ids but {len(grids)} rows in image_grid_thw")
    videos = sum(int(ids[start]) != image_token_id for start in starts)
    if videos != len(second_per_grid_ts) or (videos and tokens_per_second is None):
        raise ValueError(f"{videos} videos in the token ids but {len(second_per_grid_ts)} second_per_grid_ts "
                         f"(tokens_per_second {tokens_per_second})")
    seconds = iter(second_per_grid_ts)
    pieces, cursor, position = [], 0, 0
    for start, (grid_t, grid_h, grid_w) in zip(starts, grids):
        text_length = start - cursor
        pieces.append(torch.arange(text_length).expand(3, text_length) + position)
        position += text_length
        height, width = grid_h // spatial_merge_size, grid_w // spatial_merge_size
        count, pad = grid_t * height * width, int(ids[start])
        if start + count > length or not bool((ids[start:start + count] == pad).all()):
            raise ValueError(f"image or video at token {start} should span {count} pad tokens "
                             f"(grid {grid_t}x{grid_h}x{grid_w})")
        temporal = torch.arange(grid_t)
        if pad != image_token_id:
            temporal = (temporal * (tokens_per_second * torch.tensor(next(seconds), dtype=torch.float32))).long()
        frame, row, column = torch.meshgrid(temporal, torch.arange(height), torch.arange(width), indexing="ij")
        pieces.append(torch.stack([frame, row, column]).reshape(3, -1) + position)
        position += max(height, width)
        cursor = start + count
    pieces.append(torch.arange(length - cursor).expand(3, length - cursor) + position)
    return torch.cat(pieces, dim=1).long()


def text_positions(length: int) -> torch.Tensor:
    """rope_positions of a prompt without images or videos: every row is the token index (rope delta 0),
    without the search for vision tokens (on the host, most of a 256-token prompt's preparation)."""
    return torch.arange(length).repeat(3, 1)


def with_response_positions(prompt_positions: torch.Tensor, response_length: int) -> torch.Tensor:
    """[3, P] prompt positions -> [3, P + R]: generated tokens are text whatever their ids, continuing one past
    the prompt's largest position, as HF generate and both rollout engines place them (a sampled
    <|image_pad|> or <|vision_start|> id does not start an image)."""
    start = int(prompt_positions.max()) + 1 if prompt_positions.numel() else 0
    response = torch.arange(start, start + response_length).expand(3, response_length)
    return torch.cat([prompt_positions, response], dim=1).long()

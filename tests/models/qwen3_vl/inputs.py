"""A fixed multimodal batch for Qwen3-VL tests, with transformers as the oracle: one sample with two images of
different sizes, a text-only sample, and a two-frame video (a timestamp before each frame, as Qwen3-VL's
processor writes it) followed by an image; M-RoPE positions from models/qwen3_vl/positions.py."""
from dataclasses import dataclass
from typing import List, Optional

import torch

from mmrl_megatron.models.qwen3_vl.geometry import read_geometry
from mmrl_megatron.models.qwen3_vl.positions import rope_positions

IMAGE_GRIDS = [(1, 6, 10), (1, 4, 4)]  # (t, h, w) in patches of 16 pixels
VIDEO_GRID = (2, 4, 6)  # 2 temporal patches (4 frames) of 4 x 6 patches


@dataclass
class Sample:
    ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [3, T]
    pixel_values: Optional[torch.Tensor]  # [patches, C*T*P*P], images and videos in prompt order
    grid_thw: Optional[torch.Tensor]  # [images + videos, 3]
    is_video: List[bool]  # per grid row


def make_samples(hf_config: dict, seed: int = 3) -> List[Sample]:
    geometry = read_geometry(hf_config)
    vision = geometry.vision
    generator = torch.Generator().manual_seed(seed)
    row = vision.in_channels * vision.temporal_patch_size * vision.patch_size ** 2
    merge = vision.spatial_merge_size ** 2

    def text(n):
        return torch.randint(0, 256, (n,), generator=generator).tolist()

    def span(pad, t, h, w):
        return [geometry.vision_start_token_id] + [pad] * (t * h * w // merge) + [geometry.vision_end_token_id]

    image, video = geometry.image_token_id, geometry.video_token_id
    frames, vh, vw = VIDEO_GRID
    video_ids = text(4)
    for _ in range(frames):
        video_ids += text(3) + span(video, 1, vh, vw)  # text(3): the frame's "<t seconds>" timestamp
    layouts = [
        (text(5) + span(image, *IMAGE_GRIDS[0]) + text(3) + span(image, *IMAGE_GRIDS[1]) + text(9),
         [IMAGE_GRIDS[0], IMAGE_GRIDS[1]], [False, False]),
        (text(11), [], []),
        (video_ids + text(2) + span(image, *IMAGE_GRIDS[1]) + text(3), [VIDEO_GRID, IMAGE_GRIDS[1]], [True, False]),
    ]
    samples = []
    for ids, grids, is_video in layouts:
        grid = torch.tensor(grids) if grids else None
        pixels = torch.randn(int(grid.prod(-1).sum()), row, generator=generator) if grids else None
        tensor = torch.tensor(ids)
        samples.append(Sample(tensor, rope_positions(tensor, grid, geometry), pixels, grid, is_video))
    return samples


def packed(samples: List[Sample]):
    """input_ids [1, T], position_ids [3, 1, T], PackedSeqParams (megatron's own, THD), pixel_values, grid_thw."""
    from megatron.core.packed_seq_params import PackedSeqParams

    lengths = torch.tensor([len(s.ids) for s in samples])
    cu = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).int()
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=int(lengths.max()),
                             max_seqlen_kv=int(lengths.max()))
    ids = torch.cat([s.ids for s in samples]).unsqueeze(0)
    positions = torch.cat([s.positions for s in samples], dim=1).unsqueeze(1)
    return ids, positions, params, *_vision(samples)


def padded(samples: List[Sample], pad_id: int):
    """input_ids [B, S] right-padded, position_ids [3, B, S], pixel_values, grid_thw."""
    longest = max(len(s.ids) for s in samples)
    ids = torch.full((len(samples), longest), pad_id)
    positions = torch.zeros(3, len(samples), longest, dtype=torch.long)
    for index, sample in enumerate(samples):
        ids[index, :len(sample.ids)] = sample.ids
        positions[:, index, :len(sample.ids)] = sample.positions
    return ids, positions, *_vision(samples)


def _vision(samples):
    with_vision = [s for s in samples if s.pixel_values is not None]
    return torch.cat([s.pixel_values for s in with_vision]), torch.cat([s.grid_thw for s in with_vision])


def hf_inputs(sample: Sample) -> dict:
    """transformers' keyword inputs for a sample's images and videos, with mm_token_type_ids."""
    if sample.pixel_values is None:
        return {}
    is_video = torch.tensor(sample.is_video)
    pieces = sample.pixel_values.split(sample.grid_thw.prod(-1).tolist())
    inputs = {}
    for name, rows in (("image", ~is_video), ("video", is_video)):
        if rows.any():
            chosen = [piece for piece, keep in zip(pieces, rows.tolist()) if keep]
            inputs["pixel_values" if name == "image" else "pixel_values_videos"] = torch.cat(chosen)
            inputs[f"{name}_grid_thw"] = sample.grid_thw[rows]
    return inputs


def hf_model(hf_dir: str):
    from transformers import Qwen3VLForConditionalGeneration

    return Qwen3VLForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32).eval()


def mm_token_type_ids(model, ids: torch.Tensor) -> torch.Tensor:
    return ((ids == model.config.image_token_id).int() + 2 * (ids == model.config.video_token_id).int())[None]


def hf_logprobs(hf_dir: str, samples: List[Sample]) -> List[torch.Tensor]:
    """The oracle: transformers' Qwen3VLForConditionalGeneration, one sample at a time, positions its own."""
    model = hf_model(hf_dir)
    results = []
    with torch.no_grad():
        for sample in samples:
            extra = hf_inputs(sample)
            if extra:
                extra["mm_token_type_ids"] = mm_token_type_ids(model, sample.ids)
            logits = model(input_ids=sample.ids[None], **extra).logits[0]
            results.append(torch.log_softmax(logits[:-1], dim=-1).gather(-1, sample.ids[1:, None]).squeeze(-1))
    return results

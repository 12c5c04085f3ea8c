"""A fixed multimodal batch for Qwen2.5-VL tests: one sample with two images of different sizes
(one with ragged attention windows), one text-only sample, and one with a video of several temporal patches
followed by an image; with M-RoPE positions, packed and padded."""
from dataclasses import dataclass, field
from typing import List

import torch
import transformers
from packaging.version import Version

from mmrl_megatron.data import rope_positions

# transformers before 5.18 truncated each video's seconds per temporal patch to an integer before spacing its
# temporal positions (huggingface/transformers#48669): this batch's 2/3 s became 0, putting every temporal
# patch at one position. On those releases (5.17 on the GPU machine) the oracle is given the positions a fixed
# release computes, which are the samples' own: tests/data/test_rope.py checks them against a fixed release's
# get_rope_index on the CPU.
TRUNCATES_VIDEO_SECONDS = Version(transformers.__version__) < Version("5.18")

# (t, h, w) in patches: 3x5 merged patches cut into 2x2-merged windows leaves ragged edge windows
IMAGE_GRIDS = [(1, 6, 10), (1, 4, 4)]
# 8 frames of 56 x 84 pixels: 4 temporal patches of 4 x 6 patches; 3 frames per second of video, so the temporal
# positions are spaced by tokens_per_second x 2/3 s, a fraction that get_rope_index truncates
VIDEO_GRID, VIDEO_SECOND_PER_GRID_T = (4, 4, 6), 2 / 3


@dataclass
class Sample:
    ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [3, T]
    pixel_values: torch.Tensor  # [patches, C*T*P*P] or None, images and videos in prompt order
    grid_thw: torch.Tensor  # [images + videos, 3] or None
    kinds: List[str] = field(default_factory=list)  # "image" / "video" per grid row
    second_per_grid_ts: List[float] = field(default_factory=list)  # per video


def make_samples(hf_config: dict, seed: int = 3) -> List[Sample]:
    generator = torch.Generator().manual_seed(seed)
    vision = hf_config["vision_config"]
    merge = vision["spatial_merge_size"]
    row = vision.get("in_channels", 3) * vision["temporal_patch_size"] * vision["patch_size"] ** 2
    start, end = hf_config["vision_start_token_id"], hf_config["vision_end_token_id"]
    pads = {"image": hf_config["image_token_id"], "video": hf_config["video_token_id"]}

    def text(n):
        return torch.randint(0, 256, (n,), generator=generator).tolist()

    def vision_sample(items, text_lengths):
        """text, then each (kind, grid) item's span followed by text."""
        ids: List[int] = text(text_lengths[0])
        for (kind, (t, h, w)), length in zip(items, text_lengths[1:]):
            ids += [start] + [pads[kind]] * (t * h * w // merge ** 2) + [end] + text(length)
        grids = torch.tensor([grid for _, grid in items])
        pixels = torch.randn(int(grids.prod(-1).sum()), row, generator=generator)
        kinds = [kind for kind, _ in items]
        return ids, grids, pixels, kinds, [VIDEO_SECOND_PER_GRID_T] * kinds.count("video")

    images = vision_sample([("image", grid) for grid in IMAGE_GRIDS], [5, 3, 9])
    video = vision_sample([("video", VIDEO_GRID), ("image", IMAGE_GRIDS[1])], [4, 2, 3])
    samples = []
    for sample_ids, grids, pixels, kinds, seconds in [images, (text(11), None, None, [], []), video]:
        tensor = torch.tensor(sample_ids)
        positions = rope_positions(tensor, grids, merge, pads["image"], start, pads["video"], seconds,
                                   vision["tokens_per_second"])
        samples.append(Sample(tensor, positions, pixels, grids, kinds, seconds))
    return samples


def packed(samples: List[Sample]):
    """input_ids [1, T], position_ids [3, 1, T], PackedSeqParams, pixel_values, image_grid_thw."""
    from megatron.core.packed_seq_params import PackedSeqParams

    lengths = torch.tensor([len(s.ids) for s in samples])
    cu = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).int()
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=int(lengths.max()),
                             max_seqlen_kv=int(lengths.max()))
    ids = torch.cat([s.ids for s in samples]).unsqueeze(0)
    positions = torch.cat([s.positions for s in samples], dim=1).unsqueeze(1)
    return ids, positions, params, _images(samples)


def padded(samples: List[Sample], pad_id: int):
    """input_ids [B, S] right-padded, position_ids [3, B, S], pixel_values, image_grid_thw."""
    longest = max(len(s.ids) for s in samples)
    ids = torch.full((len(samples), longest), pad_id)
    positions = torch.zeros(3, len(samples), longest, dtype=torch.long)
    for index, sample in enumerate(samples):
        ids[index, :len(sample.ids)] = sample.ids
        positions[:, index, :len(sample.ids)] = sample.positions
    return ids, positions, _images(samples)


def _images(samples):
    with_images = [s for s in samples if s.pixel_values is not None]
    return (torch.cat([s.pixel_values for s in with_images]), torch.cat([s.grid_thw for s in with_images]))


def token_logprobs(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """[T-1] log-probs of each next token from full-vocabulary logits [T, V]."""
    return torch.log_softmax(logits[:-1].float(), dim=-1).gather(-1, ids[1:, None]).squeeze(-1)


def hf_inputs(sample: Sample, device: str, dtype) -> dict:
    """transformers' keyword inputs for a sample's images and videos (none for text), with mm_token_type_ids:
    transformers 5.x computes M-RoPE positions (get_rope_index) only when given it."""
    if sample.pixel_values is None:
        return {}
    is_video = torch.tensor([kind == "video" for kind in sample.kinds])
    patches = sample.pixel_values.split(sample.grid_thw.prod(-1).tolist())
    inputs = {}
    for name, rows in (("image", ~is_video), ("video", is_video)):
        if rows.any():
            chosen = [piece for piece, keep in zip(patches, rows.tolist()) if keep]
            inputs["pixel_values" if name == "image" else "pixel_values_videos"] = torch.cat(chosen).to(device, dtype)
            inputs[f"{name}_grid_thw"] = sample.grid_thw[rows].to(device)
    if sample.second_per_grid_ts:
        inputs["second_per_grid_ts"] = torch.tensor(sample.second_per_grid_ts, device=device)
    return inputs


def hf_logprobs(hf_dir: str, samples: List[Sample], dtype=torch.float32, device: str = "cpu") -> List[torch.Tensor]:
    """The oracle: transformers' Qwen2_5_VLForConditionalGeneration, one sample at a time, positions its own.

    The rotary buffers are checked because from_pretrained builds under a meta-device context, which
    parallel.cpu_support once broke (they came back uninitialised; tests/parallel/test_cpu_support.py).
    Videos' positions are handed over where the installed release mis-spaces them (TRUNCATES_VIDEO_SECONDS)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(hf_dir, dtype=dtype).to(device).eval()
    rotary = model.model.language_model.rotary_emb
    expected = 1.0 / rotary.config.rope_parameters["rope_theta"] ** (
        torch.arange(0, rotary.inv_freq.numel() * 2, 2).float() / (rotary.inv_freq.numel() * 2))
    assert torch.allclose(rotary.inv_freq.float().cpu(), expected), "HF oracle loaded with broken rotary buffers"
    results = []
    with torch.no_grad():
        for sample in samples:
            ids = sample.ids.to(device)
            extra = hf_inputs(sample, device, dtype)
            if extra:
                extra["mm_token_type_ids"] = ((ids == model.config.image_token_id).int()
                                              + 2 * (ids == model.config.video_token_id).int())[None]
            if sample.second_per_grid_ts and TRUNCATES_VIDEO_SECONDS:
                extra["position_ids"] = sample.positions[:, None].to(device)
            logits = model(input_ids=ids[None], **extra).logits[0]
            results.append(token_logprobs(logits, ids).cpu())
    return results

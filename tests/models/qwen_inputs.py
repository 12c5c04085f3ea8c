"""A fixed multimodal batch for Qwen2.5-VL tests: one sample with two images of different sizes
(one with ragged attention windows), one text-only sample; with M-RoPE positions, packed and padded."""
from dataclasses import dataclass
from typing import List

import torch

from mmrl_megatron.data import rope_positions

# (t, h, w) in patches: 3x5 merged patches cut into 2x2-merged windows leaves ragged edge windows
IMAGE_GRIDS = [(1, 6, 10), (1, 4, 4)]


@dataclass
class Sample:
    ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [3, T]
    pixel_values: torch.Tensor  # [patches, C*T*P*P] or None
    grid_thw: torch.Tensor  # [images, 3] or None


def make_samples(hf_config: dict, seed: int = 3) -> List[Sample]:
    generator = torch.Generator().manual_seed(seed)
    vision = hf_config["vision_config"]
    merge = vision["spatial_merge_size"]
    row = vision.get("in_channels", 3) * vision["temporal_patch_size"] * vision["patch_size"] ** 2
    image, start, end = hf_config["image_token_id"], hf_config["vision_start_token_id"], hf_config["vision_end_token_id"]

    def text(n):
        return torch.randint(0, 256, (n,), generator=generator).tolist()

    ids: List[int] = text(5)
    for t, h, w in IMAGE_GRIDS:
        ids += [start] + [image] * (t * h * w // merge ** 2) + [end] + text(3)
    ids += text(6)
    grids = torch.tensor(IMAGE_GRIDS)
    pixels = torch.randn(int(grids.prod(-1).sum()), row, generator=generator)
    samples = []
    for sample_ids, sample_grids, sample_pixels in [(ids, grids, pixels), (text(11), None, None)]:
        tensor = torch.tensor(sample_ids)
        positions = rope_positions(tensor, sample_grids, merge, image, start)
        samples.append(Sample(tensor, positions, sample_pixels, sample_grids))
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


def hf_logprobs(hf_dir: str, samples: List[Sample], dtype=torch.float32, device: str = "cpu") -> List[torch.Tensor]:
    """The oracle: transformers' Qwen2_5_VLForConditionalGeneration, one sample at a time, positions its own.

    The rotary buffers are checked because from_pretrained builds under a meta-device context, which
    parallel.cpu_support once broke (they came back uninitialised; tests/parallel/test_cpu_support.py)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(hf_dir, dtype=dtype).to(device).eval()
    rotary = model.model.language_model.rotary_emb
    expected = 1.0 / rotary.config.rope_parameters["rope_theta"] ** (
        torch.arange(0, rotary.inv_freq.numel() * 2, 2).float() / (rotary.inv_freq.numel() * 2))
    assert torch.allclose(rotary.inv_freq.float().cpu(), expected), "HF oracle loaded with broken rotary buffers"
    results = []
    with torch.no_grad():
        for sample in samples:
            # transformers 5.x computes M-RoPE positions (get_rope_index) only when given mm_token_type_ids
            ids = sample.ids.to(device)
            image_tokens = (ids == model.config.image_token_id).int()[None]
            extra = {} if sample.pixel_values is None else dict(
                pixel_values=sample.pixel_values.to(device, dtype), image_grid_thw=sample.grid_thw.to(device),
                mm_token_type_ids=image_tokens)
            logits = model(input_ids=ids[None], **extra).logits[0]
            results.append(token_logprobs(logits, ids).cpu())
    return results

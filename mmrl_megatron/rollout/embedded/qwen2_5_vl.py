"""Qwen2.5-VL in the embedded engine: transformers' Qwen2_5_VLForConditionalGeneration, M-RoPE prompts.

Checkpoints (and the bridge) use the hub names (`visual.*`, `model.layers.*`, `lm_head.*`); the
transformers>=4.52 module tree nests them (`model.visual.*`, `model.language_model.*`). The two
rename rules below are transformers' own `_checkpoint_conversion_mapping` for Qwen2.5-VL, written
out because transformers 5 buries them in a generic load-time conversion machinery.
"""
import re

import torch

from ...data.rope import rope_positions
from ..errors import RolloutError
from ..types import RolloutRequest
from .family import EmbeddedModel, eos_ids
from .forward import QwenVLDecoder
from .prompts import PreparedPrompt, check_image_placeholders, prompt_ids
from .vision import use_length_grouped_vision_attention
from .weights import skip_weight_initialisation

_CHECKPOINT_TO_MODULE = [(re.compile(r"^visual\."), "model.visual."),
                         (re.compile(r"^model\.(?!language_model\.|visual\.)"), "model.language_model.")]


def module_name(checkpoint_name: str) -> str:
    """The parameter name inside Qwen2_5_VLForConditionalGeneration for a checkpoint (hub) name."""
    for pattern, replacement in _CHECKPOINT_TO_MODULE:
        if pattern.match(checkpoint_name):
            return pattern.sub(replacement, checkpoint_name, count=1)
    return checkpoint_name


def build_empty_model(hf_dir: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Qwen2_5_VLForConditionalGeneration from hf_dir/config.json on device, weights left uninitialised."""
    from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration

    config = AutoConfig.from_pretrained(hf_dir)
    with skip_weight_initialisation(), torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.tie_weights()
    return model.eval().requires_grad_(False)


def prepare_prompt(config, request: RolloutRequest, request_index: int) -> PreparedPrompt:
    """Check that the image and video pads match the images and videos and compute M-RoPE positions.

    Positions come from data.rope_positions, the function the trainer scores with (equal to HF's
    get_rope_index, whose signature differs between transformers 5 releases).
    """
    input_ids = prompt_ids(request, request_index)
    merge = config.vision_config.spatial_merge_size
    grid = request.image_grid_thw
    expected = 0 if grid is None else int((grid.prod(-1) // merge ** 2).sum())
    pads = int(torch.isin(input_ids, torch.tensor([config.image_token_id, config.video_token_id])).sum())
    check_image_placeholders(request, request_index, pads, expected, "<|image_pad|>/<|video_pad|>",
                             "expand each image or video pad to grid_t*grid_h*grid_w/merge_size**2 copies")
    try:
        positions = rope_positions(input_ids, grid, merge, config.image_token_id, config.vision_start_token_id,
                                   config.video_token_id, request.second_per_grid_ts,
                                   config.vision_config.tokens_per_second)
    except ValueError as error:
        raise RolloutError(f"request {request_index}: {error}") from error
    rope_delta = int(positions.max()) + 1 - input_ids.numel()
    return PreparedPrompt(request_index, input_ids, positions, rope_delta, request.pixel_values, grid)


def load(hf_dir: str, device: torch.device, dtype: torch.dtype) -> EmbeddedModel:
    model = build_empty_model(hf_dir, device, dtype)
    use_length_grouped_vision_attention(model)
    parameters = dict(model.named_parameters(remove_duplicate=False))  # tied weights under each name
    return EmbeddedModel(
        module=model, decoder=QwenVLDecoder(model),
        prepare_prompt=lambda request, index: prepare_prompt(model.config, request, index),
        weight=lambda name: parameters.get(module_name(name)),
        end_of_sequence_ids=eos_ids(model.config.text_config.eos_token_id),
        pixel_dtype=model.model.visual.dtype, cuda_graphs=True)

"""Qwen2.5-VL in the embedded engine: transformers' Qwen2_5_VLForConditionalGeneration, M-RoPE prompts.

Checkpoints (and the bridge) use the hub names (`visual.*`, `model.layers.*`, `lm_head.*`); the
transformers>=4.52 module tree nests them (`model.visual.*`, `model.language_model.*`). The two
rename rules below are transformers' own `_checkpoint_conversion_mapping` for Qwen2.5-VL, written
out because transformers 5 buries them in a generic load-time conversion machinery.
"""
import re
from typing import Optional

import torch

from ..common.cached_decoder import CachedDecoder
from ..common.decode_layer import check_swiglu, qwen_decoder_layer, with_pending
from ..common.embedded import (EmbeddedModel, PreparedPrompt, check_image_placeholders, eos_ids, prompt_ids,
                               skip_weight_initialisation)
from ..common.fused_projections import fused_model_weights
from ..common.rope import rope_positions, text_positions
from ..errors import ModelError
from .embedded_vision import use_fast_vision_blocks

_CHECKPOINT_TO_MODULE = [(re.compile(r"^visual\."), "model.visual."),
                         (re.compile(r"^model\.(?!language_model\.|visual\.)"), "model.language_model.")]


def module_name(checkpoint_name: str) -> str:
    """The parameter name inside Qwen2_5_VLForConditionalGeneration for a checkpoint (hub) name."""
    for pattern, replacement in _CHECKPOINT_TO_MODULE:
        if pattern.match(checkpoint_name):
            return pattern.sub(replacement, checkpoint_name, count=1)
    return checkpoint_name


class QwenVLDecoder(CachedDecoder):
    """Runs a Qwen2_5_VLForConditionalGeneration's language model over a StaticKVCache."""

    position_rows = 3  # M-RoPE

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        language_model = model.model.language_model
        self.layers = language_model.layers
        self.final_norm = language_model.norm
        self.rotary = language_model.rotary_emb
        self.embed_tokens = language_model.embed_tokens
        self.lm_head = model.lm_head
        text = model.config.text_config
        self.num_heads = text.num_attention_heads
        self.num_kv_heads = text.num_key_value_heads
        self.key_dim = self.value_dim = text.hidden_size // text.num_attention_heads
        check_swiglu(text.hidden_act, "config.json text_config")
        self.vision_pad_ids = torch.tensor([model.config.image_token_id, model.config.video_token_id])

    def embed_prompts(self, input_ids: torch.Tensor, pixel_values: Optional[torch.Tensor],
                      image_grid_thw: Optional[torch.Tensor]) -> torch.Tensor:
        """Token embeddings [B, T, H] with the vision tower's features written over the image and video pads
        (row-major order; pixel_values holds images and videos in that order, and the tower treats a video's
        temporal patches as it does an image's, so one get_image_features call serves both)."""
        embeds = self.embed_tokens(input_ids)
        if pixel_values is None:
            return embeds
        features = self.model.model.get_image_features(pixel_values, image_grid_thw)
        # transformers >= 5.2x wraps the per-image features in an output object; earlier 5.x returns them.
        features = getattr(features, "pooler_output", features)
        features = torch.cat(list(features), dim=0).to(embeds.dtype)
        vision_mask = torch.isin(input_ids, self.vision_pad_ids.to(input_ids.device)).unsqueeze(-1)
        return embeds.masked_scatter(vision_mask, features)

    def _run_layers(self, hidden: torch.Tensor, positions: torch.Tensor, attend) -> torch.Tensor:
        """HF's Qwen2_5_VLDecoderLayer loop (decode_layer.py), with the attention core replaced by `attend`."""
        cos, sin = self.rotary(hidden, positions)
        pending = None
        for layer_index, layer in enumerate(self.layers):
            hidden, pending = qwen_decoder_layer(layer, hidden, pending, cos, sin, attend, layer_index, self.key_dim)
        return with_pending(hidden, pending)


def build_empty_model(hf_dir: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Qwen2_5_VLForConditionalGeneration from hf_dir/config.json on device, weights left uninitialised."""
    from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration

    config = AutoConfig.from_pretrained(hf_dir)
    with skip_weight_initialisation(), torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.tie_weights()
    return model.eval().requires_grad_(False)


def prepare_prompt(config, request, request_index: int) -> PreparedPrompt:
    """Check that the image and video pads match the images and videos and compute M-RoPE positions.

    Positions come from models.common.rope.rope_positions, the function the trainer scores with (equal to HF's
    get_rope_index, whose signature differs between transformers 5 releases).
    """
    input_ids = prompt_ids(request, request_index)
    merge = config.vision_config.spatial_merge_size
    grid = request.image_grid_thw
    expected = 0 if grid is None else int((grid.prod(-1) // merge ** 2).sum())
    pads = int(torch.isin(input_ids, torch.tensor([config.image_token_id, config.video_token_id])).sum())
    check_image_placeholders(request, request_index, pads, expected, "<|image_pad|>/<|video_pad|>",
                             "expand each image or video pad to grid_t*grid_h*grid_w/merge_size**2 copies")
    if pads == 0:  # text only (the check above found no images)
        return PreparedPrompt(request_index, input_ids, text_positions(input_ids.numel()), 0,
                              request.pixel_values, grid)
    try:
        positions = rope_positions(input_ids, grid, merge, config.image_token_id, config.vision_start_token_id,
                                   config.video_token_id, request.second_per_grid_ts,
                                   config.vision_config.tokens_per_second)
    except ValueError as error:
        raise ModelError(f"request {request_index}: {error}") from error
    rope_delta = int(positions.max()) + 1 - input_ids.numel()
    return PreparedPrompt(request_index, input_ids, positions, rope_delta, request.pixel_values, grid)


def load(hf_dir: str, device: torch.device, dtype: torch.dtype) -> EmbeddedModel:
    """The engine's Qwen2.5-VL for hf_dir, built empty on `device` in `dtype`."""
    model = build_empty_model(hf_dir, device, dtype)
    weights = fused_model_weights(model, "model.language_model.layers", use_fast_vision_blocks(model))
    return EmbeddedModel(
        module=model, decoder=QwenVLDecoder(model),
        prepare_prompt=lambda request, index: prepare_prompt(model.config, request, index),
        weight=lambda name: weights(module_name(name)),
        end_of_sequence_ids=eos_ids(model.config.text_config.eos_token_id),
        pixel_dtype=model.model.visual.dtype, cuda_graphs=True)

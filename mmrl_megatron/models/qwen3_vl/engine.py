"""Qwen3-VL in the embedded rollout engine: transformers' Qwen3VLForConditionalGeneration under the engine's
decode loop (rollout/embedded/), with the prompt positions the trainer scores with (positions.py).

What differs from Qwen2.5-VL's adapter (models/qwen2_5_vl/embedded.py):
- Names: the published checkpoints already use the module tree's names (`model.visual.*`,
  `model.language_model.*`, `lm_head.*`), so a checkpoint name is the parameter name.
- Attention: RMS norms over each head's queries and keys before the rotary embedding (QK-norm), and the
  interleaved M-RoPE that transformers' Qwen3VLTextRotaryEmbedding computes from [3, B, L] positions.
- DeepStack: the tower also returns one feature map per `deepstack_visual_indexes` block; each is added to
  the hidden states at the image/video pads after the matching one of the first decoder layers. Only prompts
  hold pads, so only the prefill adds them; decode steps are plain text and stay graph-capturable.
"""
from dataclasses import dataclass
from typing import List, Optional

import torch

from ..common.cached_decoder import CachedDecoder
from ..common.decode_layer import check_swiglu, qwen_decoder_layer, with_pending
from ..common.embedded import (EmbeddedModel, PreparedPrompt, check_image_placeholders, eos_ids, prompt_ids,
                               skip_weight_initialisation)
from ..common.fused_projections import fused_model_weights
from ..common.rope import text_positions
from ..errors import ModelError
from .geometry import Qwen3VLGeometry, read_geometry
from .positions import rope_positions


@dataclass
class _DeepStackFeatures:
    """The prefill's DeepStack inputs, bound to the embeddings they were computed with."""

    embeds: torch.Tensor  # embed_prompts' output: the prefill whose first hidden states these are
    visual_mask: torch.Tensor  # [B, T] bool, the image and video pads
    per_layer: List[torch.Tensor]  # [pads, H] each, added after decoder layer 0, 1, ...


class Qwen3VLDecoder(CachedDecoder):
    """Runs a Qwen3VLForConditionalGeneration's language model over a StaticKVCache."""

    position_rows = 3  # M-RoPE (interleaved: the rotary module recomposes the sections itself)

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
        self.key_dim = self.value_dim = text.head_dim
        check_swiglu(text.hidden_act, "config.json text_config")
        self.vision_pad_ids = torch.tensor([model.config.image_token_id, model.config.video_token_id])
        self._deepstack: Optional[_DeepStackFeatures] = None

    def embed_prompts(self, input_ids: torch.Tensor, pixel_values: Optional[torch.Tensor],
                      image_grid_thw: Optional[torch.Tensor]) -> torch.Tensor:
        """Token embeddings [B, T, H] with the tower's features written over the image and video pads (rows in
        prompt order; the tower treats every grid row alike, so one get_image_features call serves both).

        The DeepStack features are kept for the prefill that receives exactly these embeddings: the engine's
        interface passes only embeddings from embed_prompts to prefill."""
        embeds = self.embed_tokens(input_ids)
        self._deepstack = None
        if pixel_values is None:
            return embeds
        output = self.model.model.get_image_features(pixel_values, image_grid_thw)
        features = torch.cat(list(output.pooler_output), dim=0).to(embeds.dtype)
        visual_mask = torch.isin(input_ids, self.vision_pad_ids.to(input_ids.device))
        embeds = embeds.masked_scatter(visual_mask.unsqueeze(-1), features)
        per_layer = [torch.cat(list(feature), dim=0).to(embeds.dtype) for feature in output.deepstack_features]
        self._deepstack = _DeepStackFeatures(embeds, visual_mask, per_layer)
        return embeds

    def _deepstack_for(self, hidden: torch.Tensor) -> Optional[_DeepStackFeatures]:
        """The pending DeepStack features if `hidden` is the prefill's embeddings they belong to (released
        once taken); None for a decode step or a prefill without images."""
        pending = self._deepstack
        if pending is None or pending.embeds is not hidden:
            return None
        self._deepstack = None
        return pending

    def _run_layers(self, hidden: torch.Tensor, positions: torch.Tensor, attend) -> torch.Tensor:
        """HF's Qwen3VLTextModel layer loop (Qwen3VLTextDecoderLayer as decode_layer.py writes it, the attention
        core replaced by `attend`, then _deepstack_process after the first layers)."""
        deepstack = self._deepstack_for(hidden)
        cos, sin = self.rotary(hidden, positions)
        pending = None
        for layer_index, layer in enumerate(self.layers):
            hidden, pending = qwen_decoder_layer(layer, hidden, pending, cos, sin, attend, layer_index, self.key_dim)
            if deepstack is not None and layer_index < len(deepstack.per_layer):
                hidden, pending = with_pending(hidden, pending), None  # a new tensor: the update below is local
                hidden[deepstack.visual_mask] = hidden[deepstack.visual_mask] + deepstack.per_layer[layer_index]
        return with_pending(hidden, pending)


def build_empty_model(hf_dir: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Qwen3VLForConditionalGeneration from hf_dir/config.json on device, weights left uninitialised."""
    from transformers import AutoConfig, Qwen3VLForConditionalGeneration

    config = AutoConfig.from_pretrained(hf_dir)
    with skip_weight_initialisation(), torch.device(device):
        model = Qwen3VLForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.tie_weights()
    return model.eval().requires_grad_(False)


def prepare_prompt(geometry: Qwen3VLGeometry, request, request_index: int) -> PreparedPrompt:
    """Check that the image and video pads match the grids and compute the M-RoPE positions the trainer
    scores with (positions.rope_positions, transformers' get_rope_index)."""
    input_ids = prompt_ids(request, request_index)
    merge = geometry.vision.spatial_merge_size
    grid = request.image_grid_thw
    expected = 0 if grid is None else int((grid.prod(-1) // merge ** 2).sum())
    pads = int(torch.isin(input_ids, torch.tensor([geometry.image_token_id, geometry.video_token_id])).sum())
    check_image_placeholders(request, request_index, pads, expected, "<|image_pad|>/<|video_pad|>",
                             "expand each image pad to grid_t*grid_h*grid_w/merge_size**2 copies and each "
                             "video frame's pad to grid_h*grid_w/merge_size**2")
    if pads == 0:  # text only (the check above found no images)
        return PreparedPrompt(request_index, input_ids, text_positions(input_ids.numel()), 0,
                              request.pixel_values, grid)
    try:
        positions = rope_positions(input_ids, grid, geometry)
    except ModelError as error:  # the engine reports a family's ModelError as the request's RolloutError
        raise ModelError(f"request {request_index}: {error}") from error
    rope_delta = int(positions.max()) + 1 - input_ids.numel()
    return PreparedPrompt(request_index, input_ids, positions, rope_delta, request.pixel_values, grid)


def load(hf_dir: str, device: torch.device, dtype: torch.dtype) -> EmbeddedModel:
    """The engine's view of a Qwen3-VL checkpoint directory, built empty on `device` in `dtype`."""
    model = build_empty_model(hf_dir, device, dtype)
    geometry = read_geometry(model.config.to_dict())
    weights = fused_model_weights(model, "model.language_model.layers")
    return EmbeddedModel(
        module=model, decoder=Qwen3VLDecoder(model),
        prepare_prompt=lambda request, index: prepare_prompt(geometry, request, index),
        weight=weights,  # checkpoint names are the module tree's
        end_of_sequence_ids=eos_ids(model.config.text_config.eos_token_id),
        pixel_dtype=model.model.visual.dtype, cuda_graphs=True)

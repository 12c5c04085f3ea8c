"""Kimi-VL in the embedded engine: transformers' DeepseekV3ForCausalLM as `language_model`, the project's
MoonViT and projector (models/kimi_vl/vision.py) as `vision_tower` / `multi_modal_projector`.

The module tree is the published checkpoint's, so checkpoint names address parameters directly, except
the routed experts: transformers 5 fuses them per layer (`mlp.experts.gate_up_proj` [E, 2I, H],
`down_proj` [E, H, I]) while the checkpoint (and the bridge) name each expert's gate/up/down_proj; those
names resolve to slices of the fused tensors.

Attention runs in MLA's latent form. Per token the cache keeps the normalised KV latent c
(kv_lora_rank wide) and the rotated shared key k_rot; each head's non-rotary query q_nope is folded
through the key rows W_UK of kv_b_proj into latent space, so (q_nope W_UK) . c + q_rot . k_rot equals
HF's q . k with the expanded key, and (attention @ c) W_UV^T its attention @ v. The cache therefore holds
one KV head: keys [c; k_rot], values c. c is kept twice so that both families share one attention path
(models/common/cached_decoder.py); that is still 1,088 numbers per token and layer at A3B, against 5,120 for
expanded keys and values. Positions are 1-D, numbered from 0 per sequence, as the trainer scores them.
"""
import re
from typing import Optional

import torch
from transformers.models.deepseek_v3.modeling_deepseek_v3 import (apply_rotary_pos_emb,
                                                                   apply_rotary_pos_emb_interleave)

from ..common.cached_decoder import CachedDecoder
from ..common.embedded import (EmbeddedModel, PreparedPrompt, check_image_placeholders, eos_ids, prompt_ids,
                               skip_weight_initialisation)
from ..errors import ModelError
from .hf_config import KimiVLConfig
from .vision import MoonViT, MultiModalProjector, image_grids

_ROUTED_EXPERT = re.compile(r"^(language_model\.model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight$")


class KimiVLForRollout(torch.nn.Module):
    """The published module tree: language_model, vision_tower, multi_modal_projector."""

    def __init__(self, kimi: KimiVLConfig, dtype: torch.dtype) -> None:
        from transformers import DeepseekV3ForCausalLM

        super().__init__()
        self.language_model = DeepseekV3ForCausalLM._from_config(kimi.text, dtype=dtype, attn_implementation="sdpa")
        self.vision_tower = MoonViT(kimi.vision).to(dtype)
        self.multi_modal_projector = MultiModalProjector(kimi.vision, kimi.text.hidden_size).to(dtype)


class KimiVLDecoder(CachedDecoder):
    """DeepseekV3 decoder layers (MLA, sigmoid-routed MoE) over a StaticKVCache in latent form."""

    num_kv_heads = 1  # the latent and k_rot are shared by all heads
    position_rows = 1

    def __init__(self, model: KimiVLForRollout, media_placeholder_token_id: int) -> None:
        self.model = model
        language = model.language_model
        self.layers = language.model.layers
        self.embed_tokens = language.model.embed_tokens
        self.final_norm = language.model.norm
        self.rotary = language.model.rotary_emb
        self.lm_head = language.lm_head
        text = language.config
        self.num_heads = text.num_attention_heads
        self.key_dim = text.kv_lora_rank + text.qk_rope_head_dim
        self.value_dim = text.kv_lora_rank
        self.rotate = apply_rotary_pos_emb_interleave if text.rope_interleave else apply_rotary_pos_emb
        self.media_placeholder_token_id = media_placeholder_token_id

    def embed_prompts(self, input_ids: torch.Tensor, pixel_values: Optional[torch.Tensor],
                      image_grid_thw: Optional[torch.Tensor]) -> torch.Tensor:
        """Token embeddings [B, T, H] with MoonViT's merged, projected patches over the media placeholders."""
        embeds = self.embed_tokens(input_ids)
        if pixel_values is None:
            return embeds
        features = self.model.multi_modal_projector(self.model.vision_tower(pixel_values, image_grid_thw))
        placeholders = (input_ids == self.media_placeholder_token_id).unsqueeze(-1)
        return embeds.masked_scatter(placeholders, features.to(embeds.dtype))

    def _latent_attention_inputs(self, attention, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """(query [B, heads, L, c + rope], key [B, 1, L, c + rope], value = latent [B, 1, L, c], W_UV
        [heads, v, c]) for HF's DeepseekV3Attention `attention` over normed hidden [B, L, H]."""
        batch, length, _ = hidden.shape
        if attention.q_lora_rank is None:
            query = attention.q_proj(hidden)
        else:
            query = attention.q_b_proj(attention.q_a_layernorm(attention.q_a_proj(hidden)))
        query = query.view(batch, length, -1, attention.qk_head_dim).transpose(1, 2)
        query_nope, query_rot = query.split([attention.qk_nope_head_dim, attention.qk_rope_head_dim], dim=-1)
        latent, key_rot = attention.kv_a_proj_with_mqa(hidden).split(
            [attention.kv_lora_rank, attention.qk_rope_head_dim], dim=-1)
        latent = attention.kv_a_layernorm(latent).unsqueeze(1)
        query_rot, key_rot = self.rotate(query_rot, key_rot.unsqueeze(1), cos, sin)
        key_up, value_up = attention.kv_b_proj.weight.view(self.num_heads, -1, attention.kv_lora_rank).split(
            [attention.qk_nope_head_dim, attention.v_head_dim], dim=1)
        query = torch.cat([torch.matmul(query_nope, key_up), query_rot], dim=-1)
        return query, torch.cat([latent, key_rot], dim=-1), latent, value_up

    def _run_layers(self, hidden: torch.Tensor, positions: torch.Tensor, attend) -> torch.Tensor:
        """HF's DeepseekV3DecoderLayer.forward with MLA's core in latent form through `attend`."""
        batch, length, _ = hidden.shape
        cos, sin = self.rotary(hidden, positions[0])
        for layer_index, layer in enumerate(self.layers):
            attention = layer.self_attn
            residual = hidden
            query, key, latent, value_up = self._latent_attention_inputs(attention, layer.input_layernorm(hidden),
                                                                         cos, sin)
            attended = torch.matmul(attend(layer_index, query, key, latent, None), value_up.transpose(1, 2))
            hidden = residual + attention.o_proj(attended.transpose(1, 2).reshape(batch, length, -1))
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        return hidden


def prepare_prompt(kimi: KimiVLConfig, request, request_index: int) -> PreparedPrompt:
    """Check the media placeholders against the images (one per merged patch) and number the tokens 0..L-1."""
    input_ids = prompt_ids(request, request_index)
    grid = request.image_grid_thw
    kernel_rows, kernel_cols = kimi.vision.merge_kernel_size
    grids = [] if grid is None else image_grids(grid)
    for image, (rows, cols) in enumerate(grids):
        if rows % kernel_rows or cols % kernel_cols:
            raise ModelError(f"request {request_index}, image {image}: patch grid {rows}x{cols} does not tile "
                               f"into the {kernel_rows}x{kernel_cols} merge kernel; pad images as Kimi-VL's "
                               "processor does")
    expected = sum(rows * cols for rows, cols in grids) // (kernel_rows * kernel_cols)
    found = int((input_ids == kimi.media_placeholder_token_id).sum())
    check_image_placeholders(request, request_index, found, expected, "<|media_pad|>",
                             "expand each <|media_pad|> to (grid_h/2)*(grid_w/2) copies")
    positions = torch.arange(input_ids.numel()).unsqueeze(0)
    return PreparedPrompt(request_index, input_ids, positions, 0, request.pixel_values, grid)


def _weight_lookup(model: KimiVLForRollout):
    """Checkpoint name -> parameter, router-bias buffer, or a routed expert's slice of the fused tensors."""

    def weight(name: str) -> Optional[torch.Tensor]:
        expert = _ROUTED_EXPERT.match(name)
        try:
            if expert is None:
                # the router's bias is a buffer in transformers (megatron keeps it as one too)
                is_buffer = name.endswith(".e_score_correction_bias")
                return model.get_buffer(name) if is_buffer else model.get_parameter(name)
            experts = model.get_submodule(expert.group(1))
        except AttributeError:
            return None
        index, kind = int(expert.group(2)), expert.group(3)
        if index >= experts.num_experts:
            return None
        if kind == "down":
            return experts.down_proj.data[index]
        gate, up = experts.gate_up_proj.data[index].chunk(2, dim=0)  # transformers' fused layout: [gate; up]
        return gate if kind == "gate" else up

    return weight


def load(kimi: KimiVLConfig, device: torch.device, dtype: torch.dtype) -> EmbeddedModel:
    """The engine's Kimi-VL for a parsed config, built empty on `device` in `dtype`."""
    with skip_weight_initialisation(), torch.device(device):
        model = KimiVLForRollout(kimi, dtype)
    model.language_model.tie_weights()
    model.eval().requires_grad_(False)
    return EmbeddedModel(
        module=model, decoder=KimiVLDecoder(model, kimi.media_placeholder_token_id),
        prepare_prompt=lambda request, index: prepare_prompt(kimi, request, index),
        weight=_weight_lookup(model), end_of_sequence_ids=eos_ids(kimi.text.eos_token_id),
        pixel_dtype=dtype, cuda_graphs=False)  # the MoE routes with data-dependent shapes

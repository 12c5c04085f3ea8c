"""Qwen3-VL geometry read from a Hugging Face config.json (published 4.57-era or transformers-5.x layout).

Qwen3-VL's config is nested in both layouts (`text_config`, `vision_config`); they differ in where the
rotary settings live: `rope_scaling {mrope_section, mrope_interleaved}` + `rope_theta` (published
checkpoints) or `rope_parameters {rope_theta, mrope_section, mrope_interleaved}` (5.x). Everything
downstream reads this one typed view.
"""
from dataclasses import dataclass
from typing import Mapping, Optional, Tuple

from ..errors import ModelError

ACTIVATIONS = ("gelu_pytorch_tanh", "gelu")  # the vision MLP's: tanh-approximated or exact GELU


@dataclass(frozen=True)
class VisionGeometry:
    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    out_hidden_size: int
    patch_size: int
    temporal_patch_size: int
    in_channels: int
    spatial_merge_size: int
    num_position_embeddings: int
    deepstack_visual_indexes: Tuple[int, ...]
    hidden_act: str
    rope_theta: float

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def position_grid_side(self) -> int:
        """The learned position table is a square grid of this many positions per side."""
        return int(self.num_position_embeddings ** 0.5)


@dataclass(frozen=True)
class TextGeometry:
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    mrope_section: Tuple[int, int, int]
    max_position_embeddings: int
    tie_word_embeddings: bool


@dataclass(frozen=True)
class Qwen3VLGeometry:
    text: TextGeometry
    vision: VisionGeometry
    image_token_id: int
    video_token_id: Optional[int]
    vision_start_token_id: int
    vision_end_token_id: Optional[int]

    @property
    def deepstack_layers(self) -> int:
        """DeepStack features are added after each of the first this-many decoder layers."""
        return len(self.vision.deepstack_visual_indexes)


def _required(section: Mapping, key: str, where: str):
    if key not in section:
        raise ModelError(f"config.json: {where} has no '{key}'; is this a Qwen3-VL config (model_type qwen3_vl)?")
    return section[key]


def _text_rope(text: Mapping) -> Tuple[float, Tuple[int, int, int]]:
    parameters = text.get("rope_parameters") or text.get("rope_scaling") or {}
    theta = parameters.get("rope_theta", text.get("rope_theta", 5000000.0))
    section = parameters.get("mrope_section")
    if section is None or len(section) != 3:
        raise ModelError("config.json: text_config needs rope_parameters (or rope_scaling) with a 3-entry "
                         f"mrope_section, got {section!r}")
    return float(theta), tuple(int(x) for x in section)


def read_text(config: Mapping) -> TextGeometry:
    text = _required(config, "text_config", "the top level")
    where = "text_config"
    if text.get("attention_bias", False):
        raise ModelError("config.json: text_config.attention_bias is true; Qwen3-VL's language model has no "
                         "attention biases and this port has none either")
    hidden, heads = _required(text, "hidden_size", where), _required(text, "num_attention_heads", where)
    head_dim = text.get("head_dim") or hidden // heads
    theta, section = _text_rope(text)
    if 2 * sum(section) != head_dim:
        raise ModelError(f"config.json: mrope_section {list(section)} covers {2 * sum(section)} rotary channels, "
                         f"head_dim is {head_dim}; they must be equal")
    return TextGeometry(
        num_layers=_required(text, "num_hidden_layers", where), hidden_size=hidden,
        intermediate_size=_required(text, "intermediate_size", where), num_heads=heads,
        num_kv_heads=text.get("num_key_value_heads") or heads, head_dim=head_dim,
        vocab_size=_required(text, "vocab_size", where), rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
        rope_theta=theta, mrope_section=section, max_position_embeddings=text.get("max_position_embeddings", 262144),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))))


def read_vision(config: Mapping) -> VisionGeometry:
    vision = _required(config, "vision_config", "the top level")
    where = "vision_config"
    act = vision.get("hidden_act", "gelu_pytorch_tanh")
    if act not in ACTIVATIONS:
        raise ModelError(f"config.json: vision_config.hidden_act {act!r} is not one of {ACTIVATIONS}")
    geometry = VisionGeometry(
        depth=_required(vision, "depth", where), hidden_size=_required(vision, "hidden_size", where),
        intermediate_size=_required(vision, "intermediate_size", where), num_heads=_required(vision, "num_heads", where),
        out_hidden_size=_required(vision, "out_hidden_size", where), patch_size=vision.get("patch_size", 16),
        temporal_patch_size=vision.get("temporal_patch_size", 2), in_channels=vision.get("in_channels", 3),
        spatial_merge_size=vision.get("spatial_merge_size", 2),
        num_position_embeddings=_required(vision, "num_position_embeddings", where),
        deepstack_visual_indexes=tuple(int(i) for i in vision.get("deepstack_visual_indexes", ())),
        hidden_act=act, rope_theta=float((vision.get("rope_parameters") or {}).get("rope_theta", 10000.0)))
    if geometry.position_grid_side ** 2 != geometry.num_position_embeddings:
        raise ModelError(f"config.json: vision_config.num_position_embeddings {geometry.num_position_embeddings} "
                         "is not a square number (the learned positions form a square grid)")
    if any(not 0 <= index < geometry.depth for index in geometry.deepstack_visual_indexes):
        raise ModelError(f"config.json: vision_config.deepstack_visual_indexes {list(geometry.deepstack_visual_indexes)}"
                         f" name blocks outside 0..{geometry.depth - 1}")
    return geometry


def read_geometry(config: Mapping) -> Qwen3VLGeometry:
    """The model geometry from a config.json dict; raises ModelError naming the key."""
    text, vision = read_text(config), read_vision(config)
    if len(vision.deepstack_visual_indexes) > text.num_layers:
        raise ModelError(f"config.json: {len(vision.deepstack_visual_indexes)} deepstack_visual_indexes but only "
                         f"{text.num_layers} decoder layers to add them to")
    if vision.out_hidden_size != text.hidden_size:
        raise ModelError(f"config.json: vision_config.out_hidden_size {vision.out_hidden_size} differs from "
                         f"text_config.hidden_size {text.hidden_size}")
    return Qwen3VLGeometry(
        text=text, vision=vision, image_token_id=_required(config, "image_token_id", "the top level"),
        video_token_id=config.get("video_token_id"),
        vision_start_token_id=_required(config, "vision_start_token_id", "the top level"),
        vision_end_token_id=config.get("vision_end_token_id"))

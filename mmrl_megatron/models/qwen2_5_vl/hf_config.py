"""Qwen2.5-VL geometry read from a Hugging Face config.json, in either layout.

Published checkpoints carry the flat transformers-4.x layout (language keys at the top level,
`rope_scaling: {type: mrope, mrope_section}`); transformers 5.x writes them nested under
`text_config` with `rope_parameters`. Everything downstream reads this one normalised view.
"""
from dataclasses import dataclass
from typing import List, Mapping, Optional

from ..errors import ModelError


@dataclass(frozen=True)
class VisionShape:
    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    out_hidden_size: int
    patch_size: int
    temporal_patch_size: int
    in_channels: int
    spatial_merge_size: int
    window_size: int
    fullatt_block_indexes: List[int]
    rope_theta: float
    tokens_per_second: float = 4  # transformers' Qwen2_5_VLVisionConfig default; spaces videos' temporal positions

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass(frozen=True)
class TextShape:
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    mrope_section: List[int]
    max_position_embeddings: int
    tie_word_embeddings: bool


@dataclass(frozen=True)
class Qwen25VLShape:
    text: TextShape
    vision: VisionShape
    image_token_id: int
    vision_start_token_id: int
    video_token_id: Optional[int] = None  # videos' pads take vision features as images' do


def _required(section: Mapping, key: str, where: str):
    if key not in section:
        raise ModelError(f"config.json: {where} has no '{key}'; is this a Qwen2.5-VL config?")
    return section[key]


def _rope(section: Mapping):
    """(theta, mrope_section) from `rope_parameters` (5.x), `rope_scaling` + `rope_theta` (4.x)."""
    parameters = section.get("rope_parameters") or {}
    scaling = section.get("rope_scaling") or {}
    theta = parameters.get("rope_theta", section.get("rope_theta", 1000000.0))
    mrope = parameters.get("mrope_section", scaling.get("mrope_section"))
    if mrope is None:
        raise ModelError("config.json: no mrope_section in rope_parameters or rope_scaling")
    return float(theta), [int(x) for x in mrope]


def read_shape(config: Mapping) -> Qwen25VLShape:
    """The model geometry from a config.json dict (flat 4.x or nested 5.x); raises ModelError naming the key."""
    text = config.get("text_config") or config
    where = "text_config" if "text_config" in config else "the top level"
    theta, mrope = _rope(text)
    hidden, heads = _required(text, "hidden_size", where), _required(text, "num_attention_heads", where)
    tied = config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
    text_shape = TextShape(
        num_layers=_required(text, "num_hidden_layers", where), hidden_size=hidden,
        intermediate_size=_required(text, "intermediate_size", where), num_heads=heads,
        num_kv_heads=text.get("num_key_value_heads", heads), head_dim=text.get("head_dim") or hidden // heads,
        vocab_size=_required(text, "vocab_size", where), rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
        rope_theta=theta, mrope_section=mrope, max_position_embeddings=text.get("max_position_embeddings", 32768),
        tie_word_embeddings=bool(tied))
    vision = _required(config, "vision_config", "the top level")
    vision_rope = vision.get("rope_parameters") or {}
    vision_shape = VisionShape(
        depth=_required(vision, "depth", "vision_config"), hidden_size=_required(vision, "hidden_size", "vision_config"),
        intermediate_size=_required(vision, "intermediate_size", "vision_config"),
        num_heads=_required(vision, "num_heads", "vision_config"),
        out_hidden_size=vision.get("out_hidden_size", hidden), patch_size=vision.get("patch_size", 14),
        temporal_patch_size=vision.get("temporal_patch_size", 2), in_channels=vision.get("in_channels", 3),
        spatial_merge_size=vision.get("spatial_merge_size", 2), window_size=vision.get("window_size", 112),
        fullatt_block_indexes=list(vision.get("fullatt_block_indexes", [])),
        rope_theta=float(vision_rope.get("rope_theta", 10000.0)),
        tokens_per_second=vision.get("tokens_per_second", 4))
    return Qwen25VLShape(text=text_shape, vision=vision_shape,
                         image_token_id=_required(config, "image_token_id", "the top level"),
                         vision_start_token_id=_required(config, "vision_start_token_id", "the top level"),
                         video_token_id=config.get("video_token_id"))

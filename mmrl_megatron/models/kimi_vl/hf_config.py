"""A Kimi-VL checkpoint's config.json (as a dict, models/hf_config.py) in typed parts: the DeepSeek-V3 text
config and MoonViT's geometry.

transformers has no kimi_vl model type (the published checkpoints use remote code), so config.json is taken
as JSON; the text part becomes transformers' DeepseekV3Config, the oracle's own class, so both sides read
the same defaults.
"""
from dataclasses import dataclass
from typing import Tuple

from ..errors import ModelError


@dataclass(frozen=True)
class MoonViTConfig:
    """MoonViT geometry (the remote code's MoonViTConfig keys)."""

    patch_size: int = 14
    init_pos_emb_height: int = 64
    init_pos_emb_width: int = 64
    num_attention_heads: int = 16
    num_hidden_layers: int = 27
    hidden_size: int = 1152
    intermediate_size: int = 4304
    merge_kernel_size: Tuple[int, int] = (2, 2)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass(frozen=True)
class KimiVLConfig:
    text: object  # transformers DeepseekV3Config
    vision: MoonViTConfig
    media_placeholder_token_id: int
    raw: dict  # config.json as read, for writing it back unchanged


def _vision_config(raw: dict) -> MoonViTConfig:
    known = {name for name in MoonViTConfig.__dataclass_fields__}
    values = {key: value for key, value in raw.items() if key in known}
    if "merge_kernel_size" in values:
        values["merge_kernel_size"] = tuple(values["merge_kernel_size"])
    vision = MoonViTConfig(**values)
    if vision.head_dim % 4:
        raise ModelError(f"vision_config: head dim {vision.head_dim} (hidden_size/num_attention_heads) must be a "
                          "multiple of 4 for MoonViT's 2-D rotary embedding")
    return vision


def kimi_vl_config_from_dict(raw: dict) -> KimiVLConfig:
    """Typed config from config.json's contents; raises ModelError naming the unsupported key."""
    from transformers import DeepseekV3Config

    if raw.get("model_type") != "kimi_vl":
        raise ModelError(f"config.json model_type is {raw.get('model_type')!r}, expected 'kimi_vl'")
    text_raw = {key: value for key, value in raw["text_config"].items() if key != "model_type"}
    text = DeepseekV3Config(**text_raw)
    return KimiVLConfig(text=text, vision=_vision_config(raw.get("vision_config", {})),
                        media_placeholder_token_id=int(raw.get("media_placeholder_token_id", 163605)), raw=raw)

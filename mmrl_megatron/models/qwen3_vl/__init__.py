"""Qwen3-VL (dense) on megatron-core: geometry (config.json), rotary (interleaved M-RoPE), vision (tower and
DeepStack mergers), deepstack (feature injection into the first decoder layers), specs, build (the stage's
common/vlm.py model from its specs), conversion (HF <-> Megatron rule table), positions (get_rope_index),
engine (embedded rollout adapter), planner (memory-planner dimensions), shapes (the published checkpoints by
name), tiny (test checkpoint). FAMILY is what models.family finds; importing this package stays cheap: every
heavy part imports inside its callable.
"""
from ..family import MediaMarkup, ModelFamily
from .conversion import ALIASES
from .shapes import NAMED_SHAPES


def _geometry(hf_config):
    from .geometry import read_geometry

    return read_geometry(hf_config)


def _build(model_config, geometry, dims, role):
    from .build import build_qwen3_vl

    return build_qwen3_vl(model_config, geometry, dims, role)


def _conversion_rules(geometry, role):
    from .conversion import conversion_rules

    return conversion_rules(geometry, role)


def _positions(geometry):
    from .positions import position_rule

    return position_rule(geometry)


def _image_processor(model_dir, data_config):
    # transformers' AutoImageProcessor under data.min_pixels/max_pixels, as for Qwen2.5-VL (the checkpoint's
    # preprocessor_config.json carries Qwen3-VL's patch size 16)
    from ..common.qwen_images import QwenImageProcessor

    return QwenImageProcessor(model_dir, data_config)


def _embedded_engine(hf_dir, hf_config, device, dtype):
    from .engine import load

    return load(hf_dir, device, dtype)


def _planner_dims(geometry, name):
    from .planner import planner_dims

    return planner_dims(geometry, name)


def _tiny_checkpoint(directory):
    from .tiny import build_tiny_checkpoint

    return build_tiny_checkpoint(directory)


# Qwen3-VL's chat markup is Qwen2.5-VL's; videos stay off until the data path writes Qwen3-VL's per-frame
# timestamps (positions.py already places timestamped frames)
FAMILY = ModelFamily(
    model_type="qwen3_vl", geometry=_geometry, build=_build, conversion_rules=_conversion_rules,
    positions=_positions,
    media=MediaMarkup("<|image_pad|>", "<|vision_start|>", "<|vision_end|>", "<|im_end|>", video_pad=None),
    load_image_processor=_image_processor, embedded_engine=_embedded_engine, planner_dims=_planner_dims,
    aliases=ALIASES, tiny_checkpoint=_tiny_checkpoint, named_shapes=NAMED_SHAPES)

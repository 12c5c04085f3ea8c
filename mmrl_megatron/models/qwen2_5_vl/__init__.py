"""Qwen2.5-VL: hf_config (geometry), vision + build (the common/vlm.py model from its specs), conversion (rule
table), positions (M-RoPE), video (processor; images go through common/qwen_images.py), embedded (rollout
adapter), planner (dimensions), tiny."""
from ..family import MediaMarkup, ModelFamily
from .conversion import ALIASES


def _geometry(hf_config):
    from .hf_config import read_shape

    return read_shape(hf_config)


def _build(model_config, shape, dims, role):
    from .build import build_qwen2_5_vl

    return build_qwen2_5_vl(model_config, shape, dims, role)


def _conversion_rules(shape, role):
    from .conversion import rules

    return rules(shape, role)


def _positions(shape):
    from .positions import position_rule

    return position_rule(shape)


def _image_processor(model_dir, data_config):
    from ..common.qwen_images import QwenImageProcessor

    return QwenImageProcessor(model_dir, data_config)


def _video_processor(model_dir, data_config):
    from .video import Qwen2_5_VLVideoProcessor

    return Qwen2_5_VLVideoProcessor(model_dir, data_config)


def _embedded_engine(hf_dir, hf_config, device, dtype):
    from .embedded import load

    return load(hf_dir, device, dtype)


def _planner_dims(shape, name):
    from .planner import planner_dims

    return planner_dims(shape, name)


def _tiny_checkpoint(directory):
    from .tiny import build_tiny_checkpoint

    return build_tiny_checkpoint(directory)


FAMILY = ModelFamily(
    model_type="qwen2_5_vl", geometry=_geometry, build=_build, conversion_rules=_conversion_rules,
    positions=_positions,
    media=MediaMarkup("<|image_pad|>", "<|vision_start|>", "<|vision_end|>", "<|im_end|>", "<|video_pad|>"),
    load_image_processor=_image_processor, load_video_processor=_video_processor,
    embedded_engine=_embedded_engine, planner_dims=_planner_dims, aliases=ALIASES, tiny_checkpoint=_tiny_checkpoint)

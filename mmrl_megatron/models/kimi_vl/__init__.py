"""Kimi-VL: hf_config (geometry), vision + language_model + build (the common/vlm.py model from its specs),
conversion (rule table), positions (1-D), images (processor), embedded (rollout adapter), planner (dimensions),
tiny."""
from ..family import MediaMarkup, ModelFamily


def _geometry(hf_config):
    from .hf_config import kimi_vl_config_from_dict

    return kimi_vl_config_from_dict(dict(hf_config))


def _build(model_config, kimi, dims, role):
    from .build import build_kimi_vl

    return build_kimi_vl(model_config, kimi, dims, role)


def _conversion_rules(kimi, role):
    from .conversion import rules

    return rules(kimi, role)


def _positions(kimi):
    from .positions import position_rule

    return position_rule(kimi)


def _image_processor(model_dir, data_config):
    from .images import KimiVLImageProcessor

    return KimiVLImageProcessor.from_pretrained(model_dir, data_config)


def _embedded_engine(hf_dir, hf_config, device, dtype):
    from .embedded import load

    return load(_geometry(hf_config), device, dtype)


def _planner_dims(kimi, name):
    from .planner import planner_dims

    return planner_dims(kimi, name)


def _tiny_checkpoint(directory):
    from .tiny import build_tiny_checkpoint

    return build_tiny_checkpoint(directory)


FAMILY = ModelFamily(
    model_type="kimi_vl", geometry=_geometry, build=_build, conversion_rules=_conversion_rules,
    positions=_positions, media=MediaMarkup("<|media_pad|>", "<|media_start|>", "<|media_end|>", "<|im_end|>"),
    load_image_processor=_image_processor, embedded_engine=_embedded_engine, planner_dims=_planner_dims,
    tiny_checkpoint=_tiny_checkpoint)

"""megatron-core models per family, chosen by the HF config's model_type.

`build_model(model_config, hf_config, role)` -> this pipeline stage's module (call after
parallel.init_model_parallel). Families register a builder "module:function" in BUILDERS; it is
imported on first use so that importing this package does not import megatron-core.
"""
import importlib
from typing import Mapping

from .errors import ModelError

BUILDERS = {
    "qwen2_5_vl": "mmrl_megatron.models.qwen2_5_vl.build:build_qwen2_5_vl",
    "kimi_vl": "mmrl_megatron.models.kimi_vl.model:build_kimi_vl",
}
ROLES = ("actor", "reference", "critic")


def family_of(model_config, hf_config: Mapping) -> str:
    family = getattr(model_config, "family", "auto")
    return hf_config.get("model_type", "") if family == "auto" else family


def build_model(model_config, hf_config: Mapping, role: str):
    """This stage's model: "actor"/"reference" end in vocabulary logits, "critic" in scalar values.

    `hf_config` is the checkpoint's config.json as a dict (flat transformers-4.x or nested 5.x)."""
    if role not in ROLES:
        raise ModelError(f"role must be one of {ROLES}, got {role!r}")
    family = family_of(model_config, hf_config)
    if family not in BUILDERS:
        raise ModelError(f"no model for model_type {family!r} (config.json / model.family); known: {sorted(BUILDERS)}")
    module_name, function_name = BUILDERS[family].split(":")
    model = getattr(importlib.import_module(module_name), function_name)(model_config, hf_config, role)
    model.hf_config = dict(hf_config)  # convert.iter_hf_tensors reads the rule table's config from here
    model.role = role
    return model


__all__ = ["BUILDERS", "ModelError", "build_model", "family_of"]

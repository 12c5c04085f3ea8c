"""What a model family is, as one object, and the registry that finds it (torchtitan's ModelSpec).

Each package `mmrl_megatron.models.<family>` exports `FAMILY: ModelFamily`; importing it is cheap (no
megatron-core, no transformers: the heavy parts import inside the callables). `family_for(hf_config)` finds
the family of a checkpoint's config.json by its model_type. Adding a family adds one package and touches
nothing else.
"""
import importlib
import pkgutil
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from .errors import ModelError

ROLES = ("actor", "reference", "critic")
# (prompt ids, response length, image_grid_thw, second_per_grid_ts=()) -> [3, P + R] position ids
PositionRule = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class MediaMarkup:
    """The family's chat template writes one span per image, `vision_start ... image_pad ... vision_end`, and,
    for a family that takes videos, one per video with its video pad; the data path expands each pad to its
    image's or video's token count and never truncates inside a span."""

    image_pad: str
    vision_start: str
    vision_end: str
    end_of_turn: str  # closes a chat turn: the supervised warm-up ends its answers with it
    video_pad: Optional[str] = None  # None: the family takes no videos (rows with videos are skipped)


@dataclass(frozen=True)
class ModelFamily:
    """Everything that differs between model families, each part a function of the parsed config.

    geometry(hf_config) -> the family's typed view of config.json (flat 4.x or nested 5.x layouts).
    build(model_config, geometry, dims, role) -> this rank's pipeline stage of the started parallel.ParallelDims
    `dims`, a megatron module.
    conversion_rules(geometry, role) -> List[convert.rules.Rule]; aliases: (stored, canonical) HF prefixes.
    positions(geometry) -> PositionRule, the position ids the model scores with.
    media, load_image_processor(model_dir, data_config), load_video_processor (None: no videos).
    embedded_engine(hf_dir, hf_config, device, dtype) -> models.common.embedded.EmbeddedModel.
    planner_dims(geometry, name) -> parallel.model_dims.ModelDims for the memory planner.
    tiny_checkpoint(directory) -> a tiny random checkpoint directory for tests and demos (optional).
    named_shapes: published checkpoints by planner name ("qwen3-vl-8b") -> the config.json fields geometry()
    reads, so the planner sizes them without a download (models/planner_dims.py)."""

    model_type: str
    geometry: Callable[[Mapping], Any]
    build: Callable[[Any, Any, Any, str], torch.nn.Module]
    conversion_rules: Callable[[Any, str], List]
    positions: Callable[[Any], PositionRule]
    media: MediaMarkup
    load_image_processor: Callable[[str, Any], Callable]
    embedded_engine: Callable[..., Any]
    planner_dims: Callable[[Any, str], Any]
    aliases: Sequence[Tuple[str, str]] = ()
    load_video_processor: Optional[Callable[[str, Any], Callable]] = None
    tiny_checkpoint: Optional[Callable[[str], str]] = None
    named_shapes: Mapping[str, Mapping] = field(default_factory=dict)

    def rule_table(self, geometry, role: str = "actor"):
        """The conversion rules as convert's RuleTable, carrying this family's aliases."""
        from ..convert.rules import RuleTable

        return RuleTable(self.conversion_rules(geometry, role), self.model_type, self.aliases)


@lru_cache(maxsize=1)
def registered_families() -> Dict[str, ModelFamily]:
    """model_type -> family, over every subpackage of mmrl_megatron.models exporting FAMILY."""
    from .. import models

    found: Dict[str, ModelFamily] = {}
    for info in pkgutil.iter_modules(models.__path__):
        if not info.ispkg:
            continue
        family = getattr(importlib.import_module(f"{models.__name__}.{info.name}"), "FAMILY", None)
        if isinstance(family, ModelFamily):
            if family.model_type in found:
                raise ModelError(f"model_type {family.model_type!r} is exported by two packages (models/{info.name})")
            found[family.model_type] = family
    return found


def family_named(name: str) -> ModelFamily:
    families = registered_families()
    if name not in families:
        raise ModelError(f"no model family for model_type {name!r} (config.json model_type / model.family); "
                         f"known: {sorted(families)}")
    return families[name]


def family_for(hf_config: Mapping, override: str = "auto") -> ModelFamily:
    """The family of a config.json dict: its model_type, or `override` (model.family) unless "auto"."""
    return family_named(hf_config.get("model_type", "") if override in (None, "auto") else override)


def position_rule(hf_config: Mapping, override: str = "auto") -> PositionRule:
    """The position rule of a config.json dict's family, over its parsed geometry."""
    family = family_for(hf_config, override)
    return family.positions(family.geometry(hf_config))

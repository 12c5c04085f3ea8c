"""The memory planner's model dimensions (parallel.model_dims.ModelDims) for a checkpoint directory, through its
family, or for a published model by name (the shapes built into parallel/model_dims.py, and the families'
named_shapes, which their own geometry reader parses)."""
import os
from typing import List, Optional

from ..config.errors import ConfigError
from ..parallel.model_dims import BUILTIN_MODELS, ModelDims
from .errors import ModelError
from .family import family_for, registered_families
from .hf_config import has_hf_config, read_hf_config


def _normalise(name: str) -> str:
    return name.lower().replace("_", "-").replace("qwen2-5", "qwen2.5")


def _named_model_dims(name: str) -> Optional[ModelDims]:
    """The dimensions of the published shape whose key `name` contains (normalised), or None."""
    normalised = _normalise(name)
    for key, dims in BUILTIN_MODELS.items():
        if key in normalised:
            return dims
    for family in registered_families().values():
        for key, hf_config in family.named_shapes.items():
            if key in normalised:
                return family.planner_dims(family.geometry(hf_config), key)
    return None


def _shape_names() -> List[str]:
    return [*BUILTIN_MODELS, *(key for family in registered_families().values() for key in family.named_shapes)]


def resolve_model_dims(model: str) -> ModelDims:
    """`model` is a directory with config.json, a config.json path, or a name containing a built-in key
    (e.g. 'Qwen/Qwen2.5-VL-72B-Instruct' -> qwen2.5-vl-72b, 'Qwen/Qwen3-VL-8B-Instruct' -> qwen3-vl-8b)."""
    directory = os.path.dirname(os.path.abspath(model)) if os.path.isfile(model) else model
    if has_hf_config(directory):
        hf_config = read_hf_config(directory)
        try:
            family = family_for(hf_config)
        except ModelError as error:
            raise ConfigError(f"{directory}: the planner knows the families of models/ only ({error})") from error
        return family.planner_dims(family.geometry(hf_config), os.path.basename(os.path.abspath(directory)))
    dims = _named_model_dims(os.path.basename(model.rstrip("/")))
    if dims is None:
        raise ConfigError(f"model '{model}' has no config.json and matches no built-in shape; pass --model with one "
                          f"of {', '.join(_shape_names())} or a checkpoint directory")
    return dims

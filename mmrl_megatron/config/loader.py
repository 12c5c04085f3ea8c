"""YAML + `key=value` overrides -> a validated `Config`, merged by OmegaConf against the schema."""
import difflib
import os
from dataclasses import fields, is_dataclass
from typing import Iterable, List, Optional

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from .bounds import check_bounds
from .errors import ConfigError
from .schema import Config


def all_keys(schema=Config, prefix: str = "") -> List[str]:
    """Every dotted key the schema accepts, e.g. 'rollout.sglang.urls'."""
    keys = []
    for f in fields(schema):
        key = f"{prefix}{f.name}"
        keys.append(key)
        default = f.default_factory() if callable(f.default_factory) else f.default
        if is_dataclass(default):
            keys.extend(all_keys(type(default), key + "."))
    return keys


def closest_key(key: str) -> Optional[str]:
    """The valid key most like `key`, judged on the full dotted name and on its last part."""
    known = all_keys()
    match = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if match:
        return match[0]
    leaf = key.rsplit(".", 1)[-1]
    leaves = {k.rsplit(".", 1)[-1]: k for k in known}
    match = difflib.get_close_matches(leaf, list(leaves), n=1, cutoff=0.6)
    return leaves[match[0]] if match else None


def _explain(error: OmegaConfBaseException, source: str) -> ConfigError:
    key = getattr(error, "full_key", None) or "?"
    first_line = str(error).splitlines()[0]
    if isinstance(error, ConfigKeyError):
        suggestion = closest_key(key)
        hint = f"; did you mean '{suggestion}'?" if suggestion else ""
        return ConfigError(f"unknown config key '{key}' in {source}{hint}")
    if isinstance(error, ValidationError):
        return ConfigError(f"bad value for config key '{key}' in {source}: {first_line}")
    return ConfigError(f"config error at '{key}' in {source}: {first_line}")


def _read_yaml(path: str) -> DictConfig:
    """The file's mapping; ConfigError naming the file (and the line, for a syntax error) otherwise."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path} does not exist")
    try:
        loaded = OmegaConf.load(path)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"config file {path} is not valid YAML{where}: {problem}") from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"config file {path} must hold a mapping of sections (model:, data:, ...), "
                          f"not a {type(loaded).__name__}")
    return loaded


def load_config(path: Optional[str] = None, overrides: Iterable[str] = ()) -> Config:
    """Schema defaults, then the YAML file, then `key=value` overrides (later wins); values range-checked (the
    algorithm names against their registries: algorithms.check_algorithm_config, before training starts)."""
    merged = OmegaConf.structured(Config)
    if path is not None:
        try:
            merged = OmegaConf.merge(merged, _read_yaml(path))
        except OmegaConfBaseException as error:
            raise _explain(error, path) from None
    overrides = list(overrides)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value (e.g. trainer.steps=5)")
    try:
        merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(overrides))
        config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as error:
        raise _explain(error, "command-line overrides") from None
    check_bounds(config)
    return config


def save_resolved(config: Config, run_dir: str) -> str:
    """Write the fully resolved config to run_dir/config.yaml, so a run can be reproduced from it."""
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, "config.yaml")
    with open(path + ".tmp", "w") as handle:
        handle.write(OmegaConf.to_yaml(OmegaConf.structured(config)))
    os.replace(path + ".tmp", path)
    return path

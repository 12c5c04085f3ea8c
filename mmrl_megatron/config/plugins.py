"""User code named by a config key: a built-in name, "package.module:Name" or "path/to/file.py:Name".

Reward functions (reward.function) and rollout environments (rollout.multi_turn.environment) are found
this way; each caller checks what it got (a function, a class) and words its own errors.
"""
import importlib
import importlib.util
import os
from typing import Any, Mapping

from .errors import ConfigError


def _import_file(location: str, spec: str, key: str):
    module_spec = importlib.util.spec_from_file_location(f"user_plugin_{abs(hash(location))}", location)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as error:
        raise ConfigError(f"{key} {spec!r}: importing {location} failed: {error!r}") from error
    return module


def load_plugin(spec: str, key: str, built_ins: Mapping[str, str]) -> Any:
    """The object `spec` names; ConfigError naming `key` when the file, module or name is missing."""
    target = built_ins.get(spec, spec)
    location, separator, name = target.rpartition(":")
    if not separator or not name:
        raise ConfigError(f"{key} {spec!r}: expected one of {sorted(built_ins)} or 'path/to/file.py:name'")
    if location.endswith(".py"):
        if not os.path.isfile(location):
            raise ConfigError(f"{key} {spec!r}: file {location} does not exist")
        module = _import_file(location, spec, key)
    else:
        try:
            module = importlib.import_module(location)
        except ImportError as error:
            raise ConfigError(f"{key} {spec!r}: module {location} cannot be imported: {error}") from error
    if not hasattr(module, name):
        raise ConfigError(f"{key} {spec!r}: {location} has no {name!r}")
    return getattr(module, name)

"""Environments for multi-turn rollouts: the interface (base.py), the zoom/crop tool and a scripted test one."""
from ...config.errors import ConfigError
from ...config.plugins import load_plugin
from .base import ROLES, Conversation, Environment, EnvironmentReply, Task

BUILT_INS = {"zoom": "mmrl_megatron.rollout.environments.zoom:ZoomEnvironment",
             "scripted": "mmrl_megatron.rollout.environments.scripted:ScriptedEnvironment"}
KEY = "rollout.multi_turn.environment"


def load_environment(spec: str) -> type:
    """The environment class `spec` names (a built-in name or "path/to/file.py:ClassName"); ConfigError otherwise."""
    environment = load_plugin(spec, KEY, BUILT_INS)
    if not isinstance(environment, type) or not callable(getattr(environment, "step", None)):
        raise ConfigError(f"{KEY} {spec!r} is not a class with a step(conversation) method; subclass "
                          "mmrl_megatron.rollout.environments.Environment")
    return environment


__all__ = ["BUILT_INS", "Conversation", "Environment", "EnvironmentReply", "ROLES", "Task", "load_environment"]

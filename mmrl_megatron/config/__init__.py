"""Configuration: the schema, loading with overrides, and validation with clear errors."""
from .errors import ConfigError
from .loader import load_config, save_resolved
from .schema import Config
from .validate import ModelShape, model_shape, validate_layout

__all__ = ["Config", "ConfigError", "ModelShape", "load_config", "model_shape", "save_resolved", "validate_layout"]

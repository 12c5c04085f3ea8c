"""The default rollout backend: Qwen2.5-VL and Kimi-VL on transformers' modules with a static KV cache,
continuous batching and (where the model allows) CUDA graphs."""
from .engine import EmbeddedEngine

__all__ = ["EmbeddedEngine"]

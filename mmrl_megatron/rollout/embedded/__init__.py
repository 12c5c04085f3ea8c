"""The default rollout backend: transformers' Qwen2.5-VL with a static KV cache, continuous batching and CUDA graphs."""
from .engine import EmbeddedEngine

__all__ = ["EmbeddedEngine"]

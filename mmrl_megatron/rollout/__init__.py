"""Rollout: the engine interface, the embedded engine (default) and the SGLang backend."""
import torch

from .engine import RolloutEngine
from .errors import RolloutError
from .types import RolloutRequest, RolloutResult, SamplingParams

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def build_engine(config, hf_dir: str, device) -> RolloutEngine:
    """The engine config.rollout.backend names, for the model in hf_dir, on `device` (root `Config`)."""
    if config.rollout.backend == "sglang":
        from .sglang import SGLangEngine  # imported only when chosen: it pulls in HTTP clients

        return SGLangEngine(config.rollout, hf_dir, device)
    from .embedded import EmbeddedEngine

    return EmbeddedEngine(hf_dir, device, dtype=_DTYPES[config.model.dtype],
                          max_batch_size=config.rollout.max_batch_size, settings=config.rollout.embedded)


__all__ = ["RolloutEngine", "RolloutError", "RolloutRequest", "RolloutResult", "SamplingParams", "build_engine"]

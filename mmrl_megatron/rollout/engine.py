"""The interface every rollout backend implements; the trainer only ever talks to this."""
from abc import ABC, abstractmethod
from typing import Dict, Iterable, List, Sequence, Tuple

import torch

from .types import RolloutRequest, RolloutResult, SamplingParams

NamedTensors = List[Tuple[str, torch.Tensor]]


class RolloutEngine(ABC):
    @abstractmethod
    def generate(self, requests: Sequence[RolloutRequest], sampling: SamplingParams) -> List[RolloutResult]:
        """n results per request, ordered by (request_index, sample_index)."""

    @abstractmethod
    def update_weights(self, buckets: Iterable[NamedTensors]) -> None:
        """Load full (unsharded) tensors under their Hugging Face checkpoint names, bucket by bucket."""

    @abstractmethod
    def get_weights(self, names: Sequence[str]) -> Dict[str, torch.Tensor]:
        """The engine's current tensors under HF names (on the CPU), for verifying a weight sync."""

    def release_memory(self) -> None:
        """Free KV cache (and weights where supported) while the trainer uses the device."""

    def resume_memory(self) -> None:
        """Take back what release_memory freed, before the next generate."""

    def shutdown(self) -> None:
        """Stop servers and free everything; safe to call twice."""

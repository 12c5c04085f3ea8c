"""The interface every rollout backend implements; the trainer only ever talks to this."""
from abc import ABC, abstractmethod
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch

from .types import RolloutRequest, RolloutResult, SamplingParams

NamedTensors = List[Tuple[str, torch.Tensor]]


class WeightStream:
    """The buckets of one update_weights call, and a way to make them again from the actor's current weights.

    Iterating yields the buckets once (engines that load them once need nothing else). `again()`
    re-creates them, for an engine that must reload a server that restarted after the sync; it is None
    where the buckets cannot be re-created alone (see WeightBridge)."""

    def __init__(self, buckets: Iterable[NamedTensors], again: Optional[Callable[[], Iterable[NamedTensors]]]):
        self._buckets = buckets
        self.again = again

    def __iter__(self) -> Iterator[NamedTensors]:
        return iter(self._buckets)


class RolloutEngine(ABC):
    # False where the engine cannot return its tensors by name (SGLang 0.5.23's VL models have no
    # get_weights_by_name); the bridge then verifies a sync by log-probs (bridge/refit_check.py)
    reads_weights_by_name = True

    @abstractmethod
    def generate(self, requests: Sequence[RolloutRequest], sampling: SamplingParams) -> List[RolloutResult]:
        """n results per request, ordered by (request_index, sample_index)."""

    @abstractmethod
    def update_weights(self, buckets: Iterable[NamedTensors]) -> None:
        """Load full (unsharded) tensors under their Hugging Face checkpoint names, bucket by bucket.

        `buckets` may be a WeightStream, whose again() an engine may call later to reload the weights."""

    @abstractmethod
    def get_weights(self, names: Sequence[str]) -> Dict[str, torch.Tensor]:
        """The engine's current tensors under HF names (on the CPU), for verifying a weight sync."""

    def release_memory(self) -> None:
        """Free KV cache (and weights where supported) while the trainer uses the device."""

    def resume_memory(self) -> None:
        """Take back what release_memory freed, before the next generate."""

    def shutdown(self) -> None:
        """Stop servers and free everything; safe to call twice."""

"""A RolloutEngine that only stores weights in a dict, with SGLang's habit of skipping unknown names."""
from typing import Dict, Iterable, List, Sequence

import torch

from mmrl_megatron.rollout.engine import NamedTensors, RolloutEngine


class DictEngine(RolloutEngine):
    def __init__(self, shapes: Dict[str, tuple], dtype: torch.dtype = torch.float32) -> None:
        self.weights = {name: torch.zeros(shape, dtype=dtype) for name, shape in shapes.items()}
        self.bucket_sizes: List[int] = []

    def generate(self, requests, sampling):
        raise NotImplementedError("this engine only stores weights")

    def update_weights(self, buckets: Iterable[NamedTensors]) -> None:
        for bucket in buckets:
            self.bucket_sizes.append(sum(t.numel() * t.element_size() for _, t in bucket))
            for name, tensor in bucket:
                if name in self.weights:  # unknown names are skipped silently, as SGLang's load_weights does
                    self.weights[name].copy_(tensor)

    def get_weights(self, names: Sequence[str]) -> Dict[str, torch.Tensor]:
        return {name: self.weights[name].clone() for name in names if name in self.weights}

"""The tensor names (and shapes) of the HF checkpoint a server was started from.

SGLang's `load_weights` silently skips a non-stacked name it does not know (a wrong prefix updates
nothing and the run trains against stale weights), so every name the bridge sends is checked here
first: it must be a tensor of the checkpoint the server loaded, with the same shape.
"""
import os
from typing import Dict, Iterable, Tuple

import torch
from safetensors import safe_open

from ...models.hf_config import read_hf_config
from ..errors import RolloutError


def _tied_embeddings(hf_dir: str) -> bool:
    config = read_hf_config(hf_dir)
    text_config = config.get("text_config") or {}
    return bool(config.get("tie_word_embeddings", text_config.get("tie_word_embeddings", False)))


class CheckpointNames:
    """Names and shapes of every tensor in `hf_dir`'s safetensors files (headers only, no data)."""

    def __init__(self, hf_dir: str):
        self.hf_dir = hf_dir
        files = sorted(name for name in os.listdir(hf_dir) if name.endswith(".safetensors"))
        if not files:
            raise RolloutError(f"{hf_dir} has no .safetensors files; SGLang needs an HF checkpoint directory")
        self.shapes: Dict[str, Tuple[int, ...]] = {}
        for file_name in files:
            with safe_open(os.path.join(hf_dir, file_name), framework="pt") as handle:
                for name in handle.keys():
                    self.shapes[name] = tuple(handle.get_slice(name).get_shape())
        self.tied_embeddings = _tied_embeddings(hf_dir)

    def check(self, named_tensors: Iterable[Tuple[str, torch.Tensor]]) -> None:
        """Raise RolloutError naming every tensor SGLang would skip or reject."""
        problems = []
        for name, tensor in named_tensors:
            if name not in self.shapes:
                hint = (
                    "the checkpoint ties embeddings: send model.embed_tokens.weight only"
                    if self.tied_embeddings and name.endswith("lm_head.weight")
                    else "not a tensor of the checkpoint; SGLang would skip it silently"
                )
                problems.append(f"{name} ({hint})")
            elif tuple(tensor.shape) != self.shapes[name]:
                problems.append(f"{name} (shape {tuple(tensor.shape)}, checkpoint has {self.shapes[name]})")
        if problems:
            raise RolloutError(
                f"weight sync names that the SGLang server (started from {self.hf_dir}) would not load: "
                + "; ".join(problems)
                + ". Fix the bridge's HF name rules in mmrl_megatron/convert."
            )

"""Read tensors from a Hugging Face safetensors directory by name, one tensor at a time."""
import os
from typing import Dict, Sequence, Tuple

import torch
from safetensors import safe_open

from .errors import CheckpointError


class HFCheckpoint:
    """Tensor names (normalised through `aliases`, (stored prefix, canonical prefix) pairs) -> file.

    Opening reads only the safetensors headers; `get` reads one tensor."""

    def __init__(self, hf_dir: str, aliases: Sequence[Tuple[str, str]] = ()) -> None:
        self.hf_dir = hf_dir
        files = sorted(name for name in os.listdir(hf_dir) if name.endswith(".safetensors"))
        if not files:
            raise CheckpointError(f"{hf_dir} holds no *.safetensors files")
        self._where: Dict[str, Tuple[str, str]] = {}
        self._handles = {}
        for file_name in files:
            with safe_open(os.path.join(hf_dir, file_name), framework="pt") as handle:
                for stored in handle.keys():
                    canonical = self._canonical(stored, aliases)
                    if canonical in self._where:
                        raise CheckpointError(f"{hf_dir}: tensor {canonical} is stored twice "
                                              f"({self._where[canonical][0]} and {file_name})")
                    self._where[canonical] = (file_name, stored)

    @staticmethod
    def _canonical(name: str, aliases) -> str:
        for stored_prefix, canonical_prefix in aliases:
            if name.startswith(stored_prefix):
                return canonical_prefix + name[len(stored_prefix):]
        return name

    def names(self) -> set:
        return set(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise CheckpointError(f"{self.hf_dir}: tensor {name} is missing from the checkpoint")
        file_name, stored = self._where[name]
        if file_name not in self._handles:
            self._handles[file_name] = safe_open(os.path.join(self.hf_dir, file_name), framework="pt")
        return self._handles[file_name].get_tensor(stored)

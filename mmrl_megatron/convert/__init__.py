"""HF <-> Megatron conversion, one rule table per model family (the single source of truth).

- `load_hf_into_model(model, hf_dir)`: fill this rank's shards from HF safetensors.
- `iter_hf_tensors(model)`: (HF name, full tensor) pairs on every rank (collective over TP/PP).
- `FAMILIES`: HF model_type -> module with `rules(hf_config, role)` and `ALIASES`; families register here.
"""
from .errors import CheckpointError
from .exporter import iter_hf_tensors
from .families import FAMILIES, rule_table
from .loader import load_hf_into_model

__all__ = ["CheckpointError", "FAMILIES", "iter_hf_tensors", "load_hf_into_model", "rule_table"]

"""HF <-> Megatron conversion machinery, generic over model families: a family's rule table (its
models/<family>/conversion.py, as a rules.RuleTable) says what maps to what; convert applies it.

- `load_hf_into_model(model, hf_dir, table, dims)`: fill this rank's shards from HF safetensors.
- `iter_hf_tensors(model, dims, table=None)`: (HF name, full tensor) pairs on every rank (collective over TP/PP/EP).
`dims` is the parallel.ParallelDims the model was built under (its groups).
- checkpoint_io.py and friends: checkpoint files on disk (safetensors, megatron distributed checkpoints).
"""
from .errors import CheckpointError
from .exporter import iter_hf_tensors
from .loader import load_hf_into_model
from .rules import RuleTable

__all__ = ["CheckpointError", "RuleTable", "iter_hf_tensors", "load_hf_into_model"]

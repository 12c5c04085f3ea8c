"""Room for the compiled fused kernels' input variants.

megatron-core's bias-dropout-add and SwiGLU fusions and our RoPE (fused_rope.py) are torch.compile'd
functions, and one run calls them with many variants of their inputs: grad mode (scoring or training),
trained or frozen inputs, with or without a bias (language model or vision tower), widths and strides.
Each variant is one more compiled entry, and dynamo stops compiling a function after recompile_limit
entries (8 by default) and from then on runs it eagerly, without a word at the default log level. On an
H200 bias_dropout_add_fused_inference reached the limit in the second GRPO step (TORCH_LOGS=recompiles).
"""
import torch

COMPILED_VARIANTS_LIMIT = 64


def allow_compiled_variants(limit: int = COMPILED_VARIANTS_LIMIT) -> None:
    """Raise dynamo's per-function recompile limit to at least `limit` (idempotent; never lowers it)."""
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, limit)

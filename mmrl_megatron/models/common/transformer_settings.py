"""TransformerConfig settings the families' builders share: dtypes, recomputation, and the dense RMSNorm/SwiGLU
defaults of Qwen's language models and vision towers."""
import torch
import torch.nn.functional as F

from .compile_limits import allow_compiled_variants
from .fused_rope import fused_rope_available

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def recompute_settings(recompute: str) -> dict:
    """megatron's activation-recomputation fields for model.recompute ("none", "selective" or "full")."""
    return dict(recompute_granularity=None if recompute == "none" else recompute,
                recompute_method="uniform" if recompute == "full" else None,
                recompute_num_layers=1 if recompute == "full" else None)


def dense_settings(model_config, tensor_parallel: int, fused: bool, linear_bias: bool) -> dict:
    """Settings shared by a dense language model and its vision tower, split over `tensor_parallel` ranks;
    `fused`: Transformer Engine on a GPU; `linear_bias`: the linear layers have biases (add_bias_linear)."""
    dtype = DTYPES[model_config.dtype]
    # megatron-core's SwiGLU and bias-dropout-add fusions are torch.compile'd: one kernel each way instead of
    # an eager chain, and the SwiGLU keeps only its input for backward. On GPUs only (Triton compiles them).
    # Without a bias (and with no dropout) the residual sum is one add either way, and the compiled call only
    # adds its guard checks to the host's work in every layer.
    compiled = torch.cuda.is_available()
    if compiled:
        allow_compiled_variants()
    return dict(
        tensor_model_parallel_size=tensor_parallel, params_dtype=dtype, pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16, normalization="RMSNorm", gated_linear_unit=True, activation_func=F.silu,
        hidden_dropout=0.0, attention_dropout=0.0, use_cpu_initialization=not torch.cuda.is_available(),
        bias_activation_fusion=compiled, masked_softmax_fusion=fused, persist_layer_norm=fused,
        add_bias_linear=linear_bias, bias_dropout_fusion=compiled and linear_bias,
        apply_rope_fusion=fused_rope_available(), gradient_accumulation_fusion=False,
        **recompute_settings(model_config.recompute))

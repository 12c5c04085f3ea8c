"""Build this pipeline stage's Qwen2.5-VL from an HF config: every width comes from the config."""
import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.transformer import TransformerConfig

from ..common.compile_limits import allow_compiled_variants
from ..common.fused_rope import fused_rope_available
from ..common.specs import decoder_spec, layer_spec, resolve_attention_backend
from .hf_config import Qwen25VLShape
from .model import Qwen25VLModel

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def padded_vocab_size(vocab_size: int, divisible_by: int, tensor_parallel: int) -> int:
    """Megatron's rule: round the vocabulary up to a multiple of divisible_by * TP."""
    multiple = divisible_by * tensor_parallel
    return -(-vocab_size // multiple) * multiple


def _common(model_config, fused: bool) -> dict:
    """Settings shared by the language model and the vision tower."""
    dtype = DTYPES[model_config.dtype]
    tensor = parallel_state.get_tensor_model_parallel_world_size()
    # megatron-core's SwiGLU and bias-dropout-add fusions are torch.compile'd: one kernel each way instead of
    # an eager chain, and the SwiGLU keeps only its input for backward. On GPUs only (Triton compiles them).
    compiled = torch.cuda.is_available()
    if compiled:
        allow_compiled_variants()
    return dict(
        tensor_model_parallel_size=tensor, params_dtype=dtype, pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16, normalization="RMSNorm", gated_linear_unit=True, activation_func=F.silu,
        hidden_dropout=0.0, attention_dropout=0.0, use_cpu_initialization=not torch.cuda.is_available(),
        bias_activation_fusion=compiled, masked_softmax_fusion=fused, persist_layer_norm=fused,
        bias_dropout_fusion=compiled, apply_rope_fusion=fused_rope_available(), gradient_accumulation_fusion=False,
        recompute_granularity=None if model_config.recompute == "none" else model_config.recompute,
        recompute_method="uniform" if model_config.recompute == "full" else None,
        recompute_num_layers=1 if model_config.recompute == "full" else None,
    )


def language_config(shape: Qwen25VLShape, model_config, fused: bool) -> TransformerConfig:
    text = shape.text
    return TransformerConfig(
        num_layers=text.num_layers, hidden_size=text.hidden_size, ffn_hidden_size=text.intermediate_size,
        num_attention_heads=text.num_heads, num_query_groups=text.num_kv_heads, kv_channels=text.head_dim,
        layernorm_epsilon=text.rms_norm_eps, add_bias_linear=False, add_qkv_bias=True,
        mrope_section=text.mrope_section,
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
        **_common(model_config, fused))


def vision_config(shape: Qwen25VLShape, model_config, fused: bool) -> TransformerConfig:
    """The tower lives whole on the first pipeline stage, so it sees a pipeline size of 1."""
    vision = shape.vision
    return TransformerConfig(
        num_layers=vision.depth, hidden_size=vision.hidden_size, ffn_hidden_size=vision.intermediate_size,
        num_attention_heads=vision.num_heads, num_query_groups=vision.num_heads, kv_channels=vision.head_dim,
        layernorm_epsilon=1e-6, add_bias_linear=True, add_qkv_bias=True, pipeline_model_parallel_size=1,
        **_common(model_config, fused))


def build_qwen2_5_vl(model_config, shape: Qwen25VLShape, role: str) -> Qwen25VLModel:
    """This stage's model for role "actor"/"reference" (logits) or "critic" (values); after init_model_parallel."""
    backend = resolve_attention_backend(model_config.attention_backend)
    fused = backend == "te" and torch.cuda.is_available()
    tensor = parallel_state.get_tensor_model_parallel_world_size()
    language = language_config(shape, model_config, fused)
    model = Qwen25VLModel(
        language, vision_config(shape, model_config, fused), shape, role,
        decoder_spec(backend, language), layer_spec(backend, causal=False),
        padded_vocab_size(shape.text.vocab_size, model_config.make_vocab_size_divisible_by, tensor))
    if model.vision_model is not None:
        frozen = [model.vision_model.merger] if model_config.freeze_merger else []
        if model_config.freeze_vision_tower:
            frozen += [model.vision_model.layers]
            model.vision_model.patch_embed.requires_grad_(False)
        for module in frozen:
            module.requires_grad_(False)
    return model

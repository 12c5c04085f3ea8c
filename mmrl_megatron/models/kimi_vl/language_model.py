"""Kimi-VL's language model (DeepSeek-V3 architecture: MLA attention, sigmoid-routed MoE) on megatron-core.

Every dimension comes from the checkpoint's text config. Layers are megatron-core's local modules with
our core attention (packed sequences, and MLA's query/key width differing from the value width) and
an RMSNorm that also runs under sequence parallelism, which megatron-core's MoE layer requires with
tensor parallelism. Expert MLPs use Transformer Engine's grouped GEMM when it imports.
"""
import copy
import math
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec

from ..common.core_attention import TorchCoreAttention
from ..common.norms import RMSNorm
from ..common.specs import transformer_engine_available
from ..common.transformer_settings import recompute_settings
from ..common.vlm import LanguageSpec
from ..errors import ModelError

# transformers' DeepseekV3RMSNorm default, used for kv_a_layernorm / q_a_layernorm whatever rms_norm_eps says
LATENT_NORM_EPS = 1e-6


class LatentRMSNorm(RMSNorm):
    """MLA's norms on the compressed query/key-value: HF builds them with eps 1e-6, not the config's."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **unused):
        super().__init__(config, hidden_size, LATENT_NORM_EPS)


class LatentCoreAttention(TorchCoreAttention):
    """Core attention accepting MLA's separate query/key and value head widths."""

    def __init__(self, config, layer_number, attn_mask_type, attention_type, attention_dropout=None,
                 softmax_scale=None, k_channels: Optional[int] = None, v_channels: Optional[int] = None,
                 cp_comm_type=None, pg_collection=None):
        scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(k_channels or config.kv_channels)
        super().__init__(config, layer_number, attn_mask_type, attention_type, attention_dropout, scale,
                         cp_comm_type, pg_collection)


def _check_supported(text) -> None:
    if getattr(text, "scoring_func", "sigmoid") != "sigmoid":
        raise ModelError(f"text_config.scoring_func={text.scoring_func!r}: only 'sigmoid' (DeepSeek-V3) is supported")
    if not text.norm_topk_prob or text.num_experts_per_tok < 2:
        # megatron renormalises sigmoid top-k weights exactly when top-k > 1, as HF does with norm_topk_prob
        raise ModelError("text_config: norm_topk_prob must be true and num_experts_per_tok >= 2 "
                          f"(got {text.norm_topk_prob}, {text.num_experts_per_tok})")
    rope = text.rope_parameters or {}
    if rope.get("rope_type", "default") != "default":
        raise ModelError(f"text_config.rope_parameters.rope_type={rope.get('rope_type')!r}: only default RoPE "
                          "is mapped; add the yarn fields to language_transformer_config for scaled contexts")
    if text.n_group > 1 and text.n_routed_experts % text.n_group:
        raise ModelError(f"text_config: n_routed_experts {text.n_routed_experts} not divisible by n_group {text.n_group}")


def language_transformer_config(text, layout, params_dtype: torch.dtype = torch.float32,
                                bias_update_rate: float = 0.0, sequence_parallel: Optional[bool] = None,
                                recompute: str = "none"):
    """megatron MLATransformerConfig for a DeepseekV3Config `text` on a ParallelLayout.

    sequence_parallel defaults to on whenever TP > 1: megatron-core's MoE layer requires it with tensor
    parallelism, so packed sequences must then have a length divisible by TP.
    bias_update_rate 0 keeps the router's expert bias fixed (RL must not drift it unless asked)."""
    from megatron.core.transformer.transformer_config import MLATransformerConfig

    _check_supported(text)
    if sequence_parallel is None:
        sequence_parallel = layout.tensor > 1
    dense_layers = min(text.first_k_dense_replace, text.num_hidden_layers)
    cpu = not torch.cuda.is_available()
    return MLATransformerConfig(
        num_layers=text.num_hidden_layers, hidden_size=text.hidden_size,
        num_attention_heads=text.num_attention_heads, ffn_hidden_size=text.intermediate_size,
        normalization="RMSNorm", layernorm_epsilon=text.rms_norm_eps, gated_linear_unit=True,
        activation_func=F.silu, add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0,
        multi_latent_attention=True, q_lora_rank=text.q_lora_rank, kv_lora_rank=text.kv_lora_rank,
        qk_head_dim=text.qk_nope_head_dim, qk_pos_emb_head_dim=text.qk_rope_head_dim,
        v_head_dim=text.v_head_dim, qk_layernorm=True, rope_type="rope",
        rotary_base=float(text.rope_parameters["rope_theta"]), rotary_scaling_factor=1.0, mscale=1.0,
        mscale_all_dim=1.0,
        num_moe_experts=text.n_routed_experts, moe_ffn_hidden_size=text.moe_intermediate_size,
        moe_router_topk=text.num_experts_per_tok,
        moe_layer_freq=[0] * dense_layers + [1] * (text.num_hidden_layers - dense_layers),
        moe_shared_expert_intermediate_size=(text.n_shared_experts or 0) * text.moe_intermediate_size or None,
        moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
        moe_router_bias_update_rate=bias_update_rate, moe_router_topk_scaling_factor=text.routed_scaling_factor,
        moe_router_num_groups=text.n_group if text.n_group > 1 else None,
        moe_router_group_topk=text.topk_group if text.n_group > 1 else None,
        moe_router_dtype="fp32", moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0,
        # the alltoall dispatcher creates CUDA streams; allgather is the CPU path (shared/reference/megatron_cpu.md)
        moe_token_dispatcher_type="allgather" if cpu else "alltoall",
        moe_grouped_gemm=grouped_gemm_available(),
        tensor_model_parallel_size=layout.tensor, pipeline_model_parallel_size=layout.pipeline,
        expert_model_parallel_size=layout.expert, expert_tensor_parallel_size=layout.expert_tensor,
        sequence_parallel=sequence_parallel, params_dtype=params_dtype, pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16, use_cpu_initialization=cpu,
        **recompute_settings(recompute),
        init_method_std=getattr(text, "initializer_range", 0.02),
        bias_activation_fusion=False, bias_dropout_fusion=False, masked_softmax_fusion=False,
        persist_layer_norm=False, apply_rope_fusion=False, gradient_accumulation_fusion=False,
    )


def grouped_gemm_available() -> bool:
    """Grouped expert GEMMs need Transformer Engine on a GPU; elsewhere experts run one after another."""
    return torch.cuda.is_available() and transformer_engine_available()


def _layer_spec(config, moe: bool) -> ModuleSpec:
    from megatron.core.models.gpt import gpt_layer_specs

    with warnings.catch_warnings():  # "Apex is not installed": our RMSNorm replaces it anyway
        warnings.simplefilter("ignore", UserWarning)
        spec = copy.deepcopy(gpt_layer_specs.get_gpt_layer_local_spec(
            num_experts=config.num_moe_experts if moe else None, moe_grouped_gemm=False,
            qk_layernorm=True, multi_latent_attention=True, normalization="RMSNorm"))
    if moe and config.moe_grouped_gemm:
        from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec

        spec.submodules.mlp.submodules.experts = get_moe_module_spec(
            use_te=True, num_experts=config.num_moe_experts, moe_grouped_gemm=True).submodules.experts
    spec.submodules.input_layernorm = RMSNorm
    spec.submodules.pre_mlp_layernorm = RMSNorm
    attention = spec.submodules.self_attention.submodules
    attention.core_attention = LatentCoreAttention
    attention.q_layernorm = LatentRMSNorm
    attention.kv_layernorm = LatentRMSNorm
    spec.submodules.self_attention.params = {"attn_mask_type": AttnMaskType.causal}
    return spec


def decoder_block_spec(config, pp_rank: Optional[int] = None):
    """This pipeline stage's layer specs (dense for the first first_k_dense_replace layers, MoE after)."""
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    pattern = config.moe_layer_freq
    offset = get_transformer_layer_offset(config, pp_rank=pp_rank)
    count = get_num_layers_to_build(config, pp_rank=pp_rank)
    specs = [_layer_spec(config, moe=bool(pattern[offset + index])) for index in range(count)]
    return TransformerBlockSubmodules(layer_specs=specs, layer_norm=RMSNorm)


def _mla_and_moe_without_transformer_engine() -> None:
    """Without Transformer Engine, megatron-core 0.16.1 stands a mock in for TELinear yet still sets MLA's
    HAVE_TE, and MLASelfAttention's isinstance(linear_proj, TELinear) then raises: clear the flag. Its MoE
    router also names moe_utils.te_general_gemm, which only a TE import defines: define it as absent."""
    from megatron.core.transformer import multi_latent_attention
    from megatron.core.transformer.moe import moe_utils

    if not transformer_engine_available():
        multi_latent_attention.HAVE_TE = False
        if not hasattr(moe_utils, "te_general_gemm"):
            moe_utils.te_general_gemm = None


def language_spec(text, config) -> LanguageSpec:
    """This stage's GPTModel as common/vlm.py builds it; position ids are unused: MLA ropes each packed
    sequence itself."""
    _mla_and_moe_without_transformer_engine()
    if text.vocab_size % config.tensor_model_parallel_size:
        raise ModelError(f"text_config.vocab_size {text.vocab_size} is not divisible by parallel.tensor "
                          f"{config.tensor_model_parallel_size}")
    return LanguageSpec(
        config=config, layer_spec=decoder_block_spec(config), vocab_size=text.vocab_size,
        max_sequence_length=text.max_position_embeddings, position_embedding_type="rope",
        rotary_base=int(text.rope_parameters["rope_theta"]), tie_word_embeddings=bool(text.tie_word_embeddings))

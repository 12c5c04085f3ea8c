"""Kimi-VL's dimensions for the memory planner (parallel/model_dims.py), from its parsed config: the
DeepSeek-V3 text config (MLA + MoE) and MoonViT, replicated over tensor parallelism (models/kimi_vl/build.py)."""
from ...parallel.model_dims import LanguageDims, ModelDims, VisionDims
from .hf_config import KimiVLConfig


def planner_dims(kimi: KimiVLConfig, name: str) -> ModelDims:
    text, vision = kimi.text, kimi.vision
    moe_ffn = text.moe_intermediate_size or 0
    language = LanguageDims(
        text.num_hidden_layers, text.hidden_size, text.num_attention_heads,
        text.num_key_value_heads or text.num_attention_heads, text.v_head_dim, text.intermediate_size,
        text.vocab_size, bool(text.tie_word_embeddings), attention="mla", q_lora_rank=text.q_lora_rank or 0,
        kv_lora_rank=text.kv_lora_rank, qk_nope_head_dim=text.qk_nope_head_dim,
        qk_rope_head_dim=text.qk_rope_head_dim, v_head_dim=text.v_head_dim,
        num_experts=text.n_routed_experts or 0, experts_per_token=text.num_experts_per_tok or 0, moe_ffn=moe_ffn,
        shared_ffn=(text.n_shared_experts or 0) * moe_ffn, first_dense_layers=text.first_k_dense_replace or 0,
        fused_swiglu=False)
    tower = VisionDims("moonvit", vision.num_hidden_layers, vision.hidden_size, vision.intermediate_size,
                       vision.num_attention_heads, vision.patch_size, vision.merge_kernel_size[0], 1,
                       vision.init_pos_emb_height * vision.init_pos_emb_width, split_over_tensor_parallel=False)
    return ModelDims(name, language, tower)

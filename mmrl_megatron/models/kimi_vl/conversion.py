"""Kimi-VL: the rule table between megatron-core names and the published checkpoint names.

Megatron names are models/kimi_vl's: `language_model.` + megatron-core GPTModel names (local layer spec,
MLA, MoE with SequentialMLP or TE's grouped experts), and `vision_tower.*` / `multi_modal_projector.*`,
which equal the checkpoint's. Rules use the global layer index and the global expert id: per rank,
layer = layer_number - 1 and expert = ep_rank * experts_per_rank + local id (mbridge, Megatron-Bridge and
slime do the same). MLA tensors are copied as they are (megatron's MLA applies DeepSeek's interleaved
rope itself). Tensor-parallel splits follow each parameter's own `partition_dim`, over the expert-TP
group for expert weights; gated fc1 weights split gate and up separately (rules.GATED).

convert's one loader and exporter apply it: the router's expert bias is a buffer (Rule.buffer), and
TEGroupedMLP's fc2 is split on its input dimension whatever its partition_dim says (Rule.split_axis).
"""
from typing import List

from ...convert.rules import GATED, Rule
from ..errors import ModelError
from .hf_config import KimiVLConfig, MoonViTConfig

_M = "language_model.decoder.layers.{layer}."
_H = "language_model.model.layers.{layer}."
_VISION_BLOCK = ("norm0", "norm1", "wqkv", "wo", "mlp.fc0", "mlp.fc1")


def _language_rules(text) -> List[Rule]:
    """`text`: transformers' DeepseekV3Config."""
    layers = (("layer", text.num_hidden_layers),)
    experts = layers + (("expert", text.n_routed_experts),)
    attention = [("linear_q_proj", "q_proj"), ("linear_q_down_proj", "q_a_proj"), ("q_layernorm", "q_a_layernorm"),
                 ("linear_q_up_proj", "q_b_proj"), ("linear_kv_down_proj", "kv_a_proj_with_mqa"),
                 ("kv_layernorm", "kv_a_layernorm"), ("linear_kv_up_proj", "kv_b_proj"), ("linear_proj", "o_proj")]
    table = [
        Rule(("language_model.embedding.word_embeddings.weight",), ("language_model.model.embed_tokens.weight",)),
        Rule(("language_model.decoder.final_layernorm.weight",), ("language_model.model.norm.weight",)),
        Rule((_M + "input_layernorm.weight",), (_H + "input_layernorm.weight",), ranges=layers),
        Rule((_M + "pre_mlp_layernorm.weight",), (_H + "post_attention_layernorm.weight",), ranges=layers),
    ]
    table += [Rule((f"{_M}self_attention.{ours}.weight",), (f"{_H}self_attn.{theirs}.weight",), ranges=layers)
              for ours, theirs in attention]
    for ours, theirs in (("mlp", "mlp"), ("mlp.shared_experts", "mlp.shared_experts")):
        table += [Rule((f"{_M}{ours}.linear_fc1.weight",), (f"{_H}{theirs}.gate_proj.weight", f"{_H}{theirs}.up_proj.weight"),
                       GATED, layers),
                  Rule((f"{_M}{ours}.linear_fc2.weight",), (f"{_H}{theirs}.down_proj.weight",), ranges=layers)]
    table += [
        Rule((_M + "mlp.router.weight",), (_H + "mlp.gate.weight",), ranges=layers),
        Rule((_M + "mlp.router.expert_bias",), (_H + "mlp.gate.e_score_correction_bias",), ranges=layers,
             buffer=True),
        # SequentialMLP (local spec) and TEGroupedMLP (grouped GEMM) name the same expert weights differently
        Rule((_M + "mlp.experts.local_experts.{expert}.linear_fc1.weight", _M + "mlp.experts.linear_fc1.weight{expert}"),
             (_H + "mlp.experts.{expert}.gate_proj.weight", _H + "mlp.experts.{expert}.up_proj.weight"), GATED, experts),
        Rule((_M + "mlp.experts.local_experts.{expert}.linear_fc2.weight", _M + "mlp.experts.linear_fc2.weight{expert}"),
             (_H + "mlp.experts.{expert}.down_proj.weight",), ranges=experts, split_axis=1),
    ]
    if text.tie_word_embeddings:
        # the last stage's copy of the embedding (pipeline > 1); exported once, as the embedding
        table.append(Rule(("language_model.output_layer.weight",), ("language_model.model.embed_tokens.weight",),
                          export=False))
    else:
        table.append(Rule(("language_model.output_layer.weight",), ("language_model.lm_head.weight",)))
    return table


def _vision_rules(vision: MoonViTConfig) -> List[Rule]:
    """The replicated tower and projector: the same names on both sides."""
    blocks = (("block", vision.num_hidden_layers),)
    names = ["vision_tower.patch_embed.proj.weight", "vision_tower.patch_embed.proj.bias",
             "vision_tower.patch_embed.pos_emb.weight", "vision_tower.encoder.final_layernorm.weight",
             "vision_tower.encoder.final_layernorm.bias"]
    names += [f"multi_modal_projector.{module}.{kind}" for module in ("pre_norm", "linear_1", "linear_2")
              for kind in ("weight", "bias")]
    table = [Rule((name,), (name,)) for name in names]
    table += [Rule((f"vision_tower.encoder.blocks.{{block}}.{module}.{kind}",),
                   (f"vision_tower.encoder.blocks.{{block}}.{module}.{kind}",), ranges=blocks)
              for module in _VISION_BLOCK for kind in ("weight", "bias")]
    return table


def rules(kimi: KimiVLConfig, role: str) -> List[Rule]:
    """The rule table for a parsed kimi_vl config; roles "actor"/"reference" (no critic head yet)."""
    if role == "critic":
        raise ModelError("Kimi-VL has no critic head: no rules for role 'critic'")
    return _language_rules(kimi.text) + _vision_rules(kimi.vision)

"""Qwen2.5-VL: Megatron (models/qwen2_5_vl) <-> Hugging Face checkpoint names.

HF names are the hub's (`model.layers.*`, `visual.*`, `lm_head.*`); checkpoints holding transformers'
in-memory names (`model.language_model.*`, `model.visual.*`) load through ALIASES.
"""
from typing import List, Mapping

from ...convert.rules import COPY, GATED, GroupedQKV, PaddedVocab, Rule
from .hf_config import Qwen25VLShape

ALIASES = (("model.language_model.", "model."), ("model.visual.", "visual."))


def _layer_rules(megatron_prefix: str, hf_prefix: str, count_name: str, count: int, names: Mapping[str, str],
                 qkv: GroupedQKV, biases: bool) -> List[Rule]:
    """The rules of one transformer block stack; `names` maps our roles to the HF module names."""
    m, h, ranges = f"{megatron_prefix}.{{{count_name}}}", f"{hf_prefix}.{{{count_name}}}", ((count_name, count),)
    suffixes = ("weight", "bias") if biases else ("weight",)
    rules = [
        Rule((f"{m}.input_layernorm.weight", f"{m}.self_attention.linear_qkv.layer_norm_weight"),
             (f"{h}.{names['norm1']}.weight",), ranges=ranges),
        Rule((f"{m}.pre_mlp_layernorm.weight", f"{m}.mlp.linear_fc1.layer_norm_weight"),
             (f"{h}.{names['norm2']}.weight",), ranges=ranges),
    ]
    for suffix in ("weight", "bias"):
        rules.append(Rule((f"{m}.self_attention.linear_qkv.{suffix}",),
                          tuple(f"{h}.{name}.{suffix}" for name in names["qkv"]), qkv, ranges))
    for suffix in suffixes:
        rules += [
            Rule((f"{m}.self_attention.linear_proj.{suffix}",), (f"{h}.{names['proj']}.{suffix}",), ranges=ranges),
            Rule((f"{m}.mlp.linear_fc1.{suffix}",), (f"{h}.mlp.gate_proj.{suffix}", f"{h}.mlp.up_proj.{suffix}"),
                 GATED, ranges),
            Rule((f"{m}.mlp.linear_fc2.{suffix}",), (f"{h}.mlp.down_proj.{suffix}",), ranges=ranges),
        ]
    return rules


def rules(shape: Qwen25VLShape, role: str) -> List[Rule]:
    """The rule table for this geometry and role ("critic" has a value head instead of lm_head)."""
    text, vision = shape.text, shape.vision
    vocab = PaddedVocab(text.vocab_size)
    table = [Rule(("language_model.embedding.word_embeddings.weight",), ("model.embed_tokens.weight",), vocab)]
    table += _layer_rules(
        "language_model.decoder.layers", "model.layers", "layer", text.num_layers,
        {"norm1": "input_layernorm", "norm2": "post_attention_layernorm", "proj": "self_attn.o_proj",
         "qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")},
        GroupedQKV(text.num_heads, text.num_kv_heads, text.head_dim), biases=False)
    table.append(Rule(("language_model.decoder.final_layernorm.weight",), ("model.norm.weight",)))
    if role == "critic":
        table += [Rule(("language_model.output_layer.weight",), ("score.weight",), optional=True),
                  Rule(("language_model.output_layer.bias",), ("score.bias",), optional=True)]
    elif text.tie_word_embeddings:
        # the last stage's copy of the embedding (pipeline > 1); exported once, as the embedding
        table.append(Rule(("language_model.output_layer.weight",), ("model.embed_tokens.weight",), vocab,
                          export=False))
    else:
        table.append(Rule(("language_model.output_layer.weight",), ("lm_head.weight",), vocab))
    table.append(Rule(("vision_model.patch_embed",), ("visual.patch_embed.proj.weight",), COPY))
    table += _layer_rules(
        "vision_model.layers", "visual.blocks", "block", vision.depth,
        {"norm1": "norm1", "norm2": "norm2", "proj": "attn.proj", "qkv": ("attn.qkv",)},
        GroupedQKV(vision.num_heads, vision.num_heads, vision.head_dim, fused_hf=True), biases=True)
    table += [
        Rule(("vision_model.merger.ln_q.weight",), ("visual.merger.ln_q.weight",)),
        Rule(("vision_model.merger.linear_fc1.weight",), ("visual.merger.mlp.0.weight",)),
        Rule(("vision_model.merger.linear_fc1.bias",), ("visual.merger.mlp.0.bias",)),
        Rule(("vision_model.merger.linear_fc2.weight",), ("visual.merger.mlp.2.weight",)),
        Rule(("vision_model.merger.linear_fc2.bias",), ("visual.merger.mlp.2.bias",)),
    ]
    return table

"""Qwen3-VL: Megatron (models/qwen3_vl) <-> Hugging Face checkpoint names.

The published checkpoints (Qwen/Qwen3-VL-*) store transformers' own module names, which transformers
loads without a conversion mapping: `model.language_model.*`, `model.visual.*`, `lm_head.*`.
"""
from typing import List, Tuple

from ...convert.rules import COPY, GATED, GroupedQKV, PaddedVocab, Rule
from .geometry import Qwen3VLGeometry

ALIASES: Tuple[Tuple[str, str], ...] = ()  # the hub's names are the canonical ones
LANGUAGE, VISION = "model.language_model", "model.visual"


def _language_layer_rules(geometry: Qwen3VLGeometry) -> List[Rule]:
    text = geometry.text
    m, h = "language_model.decoder.layers.{layer}", f"{LANGUAGE}.layers.{{layer}}"
    ranges = (("layer", text.num_layers),)
    qkv = GroupedQKV(text.num_heads, text.num_kv_heads, text.head_dim)
    pairs = [
        ((f"{m}.input_layernorm.weight", f"{m}.self_attention.linear_qkv.layer_norm_weight"),
         (f"{h}.input_layernorm.weight",), COPY),
        ((f"{m}.self_attention.linear_qkv.weight",),
         tuple(f"{h}.self_attn.{name}_proj.weight" for name in "qkv"), qkv),
        ((f"{m}.self_attention.q_layernorm.weight",), (f"{h}.self_attn.q_norm.weight",), COPY),
        ((f"{m}.self_attention.k_layernorm.weight",), (f"{h}.self_attn.k_norm.weight",), COPY),
        ((f"{m}.self_attention.linear_proj.weight",), (f"{h}.self_attn.o_proj.weight",), COPY),
        ((f"{m}.pre_mlp_layernorm.weight", f"{m}.mlp.linear_fc1.layer_norm_weight"),
         (f"{h}.post_attention_layernorm.weight",), COPY),
        ((f"{m}.mlp.linear_fc1.weight",), (f"{h}.mlp.gate_proj.weight", f"{h}.mlp.up_proj.weight"), GATED),
        ((f"{m}.mlp.linear_fc2.weight",), (f"{h}.mlp.down_proj.weight",), COPY),
    ]
    return [Rule(megatron, hf, transform, ranges) for megatron, hf, transform in pairs]


def _merger_rules(megatron: str, hf: str, ranges=()) -> List[Rule]:
    return [Rule((f"{megatron}.{module}.{suffix}",), (f"{hf}.{module}.{suffix}",), ranges=ranges)
            for module in ("norm", "linear_fc1", "linear_fc2") for suffix in ("weight", "bias")]


def _vision_rules(geometry: Qwen3VLGeometry) -> List[Rule]:
    vision = geometry.vision
    m, h = "vision_model.layers.{block}", f"{VISION}.blocks.{{block}}"
    ranges = (("block", vision.depth),)
    qkv = GroupedQKV(vision.num_heads, vision.num_heads, vision.head_dim, fused_hf=True)
    rules = [Rule(("vision_model.patch_embed.weight",), (f"{VISION}.patch_embed.proj.weight",)),
             Rule(("vision_model.patch_embed.bias",), (f"{VISION}.patch_embed.proj.bias",)),
             Rule(("vision_model.pos_embed.weight",), (f"{VISION}.pos_embed.weight",))]
    for suffix in ("weight", "bias"):
        te_norm = f"layer_norm_{suffix}"
        rules += [
            Rule((f"{m}.input_layernorm.{suffix}", f"{m}.self_attention.linear_qkv.{te_norm}"),
                 (f"{h}.norm1.{suffix}",), ranges=ranges),
            Rule((f"{m}.self_attention.linear_qkv.{suffix}",), (f"{h}.attn.qkv.{suffix}",), qkv, ranges),
            Rule((f"{m}.self_attention.linear_proj.{suffix}",), (f"{h}.attn.proj.{suffix}",), ranges=ranges),
            Rule((f"{m}.pre_mlp_layernorm.{suffix}", f"{m}.mlp.linear_fc1.{te_norm}"),
                 (f"{h}.norm2.{suffix}",), ranges=ranges),
            Rule((f"{m}.mlp.linear_fc1.{suffix}",), (f"{h}.mlp.linear_fc1.{suffix}",), ranges=ranges),
            Rule((f"{m}.mlp.linear_fc2.{suffix}",), (f"{h}.mlp.linear_fc2.{suffix}",), ranges=ranges),
        ]
    rules += _merger_rules("vision_model.merger", f"{VISION}.merger")
    if vision.deepstack_visual_indexes:
        rules += _merger_rules("vision_model.deepstack_merger_list.{merger}", f"{VISION}.deepstack_merger_list.{{merger}}",
                               (("merger", len(vision.deepstack_visual_indexes)),))
    return rules


def conversion_rules(geometry: Qwen3VLGeometry, role: str) -> List[Rule]:
    """The rule table for this geometry and role ("critic" has a value head instead of lm_head)."""
    text = geometry.text
    vocab = PaddedVocab(text.vocab_size)
    embedding = f"{LANGUAGE}.embed_tokens.weight"
    table = [Rule(("language_model.embedding.word_embeddings.weight",), (embedding,), vocab)]
    table += _language_layer_rules(geometry)
    table.append(Rule(("language_model.decoder.final_layernorm.weight",), (f"{LANGUAGE}.norm.weight",)))
    if role == "critic":
        table += [Rule(("language_model.output_layer.weight",), ("score.weight",), optional=True),
                  Rule(("language_model.output_layer.bias",), ("score.bias",), optional=True)]
    elif text.tie_word_embeddings:
        # the last stage's copy of the embedding (pipeline > 1); exported once, as the embedding
        table.append(Rule(("language_model.output_layer.weight",), (embedding,), vocab, export=False))
    else:
        table.append(Rule(("language_model.output_layer.weight",), ("lm_head.weight",), vocab))
    return table + _vision_rules(geometry)

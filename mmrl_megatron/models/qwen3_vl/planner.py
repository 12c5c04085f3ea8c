"""Qwen3-VL's dimensions for the memory planner (parallel/model_dims.py), from its parsed geometry.

The tower's blocks are the LayerNorm/GELU kind ("moonvit": LayerNorms with biases, a two-layer GELU MLP,
biased attention) with a biased Conv3d patch embedding over `temporal_patch` frames and a learned position
table; unlike MoonViT it has no final norm and adds one patch merger per DeepStack layer, whose LayerNorm
spans the merged width. The language model is Qwen3's: no q/k/v biases, an RMSNorm over each head's
queries and keys (VisionDims.final_norm and postshuffle_mergers, LanguageDims.qkv_bias and qk_norm say so).
The published checkpoints' geometries are in shapes.py.
"""
from ...parallel.model_dims import LanguageDims, ModelDims, VisionDims
from .geometry import Qwen3VLGeometry


def planner_dims(geometry: Qwen3VLGeometry, name: str = "qwen3-vl") -> ModelDims:
    text, vision = geometry.text, geometry.vision
    language = LanguageDims(text.num_layers, text.hidden_size, text.num_heads, text.num_kv_heads, text.head_dim,
                            text.intermediate_size, text.vocab_size, text.tie_word_embeddings,
                            qkv_bias=False, qk_norm=True)
    tower = VisionDims("moonvit", vision.depth, vision.hidden_size, vision.intermediate_size, vision.num_heads,
                       vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size,
                       pos_emb_cells=vision.num_position_embeddings, final_norm=False,
                       postshuffle_mergers=len(vision.deepstack_visual_indexes))
    return ModelDims(name, language, tower)

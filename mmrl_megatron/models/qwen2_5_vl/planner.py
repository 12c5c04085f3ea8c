"""Qwen2.5-VL's dimensions for the memory planner (parallel/model_dims.py), from its parsed config."""
from ...parallel.model_dims import LanguageDims, ModelDims, VisionDims
from .hf_config import Qwen25VLShape


def planner_dims(shape: Qwen25VLShape, name: str) -> ModelDims:
    text, vision = shape.text, shape.vision
    language = LanguageDims(text.num_layers, text.hidden_size, text.num_heads, text.num_kv_heads, text.head_dim,
                            text.intermediate_size, text.vocab_size, text.tie_word_embeddings)
    tower = VisionDims("qwen2_5_vit", vision.depth, vision.hidden_size, vision.intermediate_size, vision.num_heads,
                       vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size)
    return ModelDims(name, language, tower)

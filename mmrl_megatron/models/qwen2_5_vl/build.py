"""Build this pipeline stage's Qwen2.5-VL from an HF config: every width comes from the config.

The language model is megatron-core's GPTModel with multimodal RoPE (3-axis position ids); the first stage
also holds the vision tower, whose merged-patch embeddings replace the <|image_pad|> and <|video_pad|> token
embeddings before the decoder (a video's frames are patches of the same tower, temporal_patch_size frames to a
patch). The stage module is common/vlm.py's, composed from these specs.
"""
import torch
from megatron.core.transformer import TransformerConfig

from ...parallel import ParallelDims
from ..common.heads import head_for_role, padded_vocab_size
from ..common.specs import decoder_spec, layer_spec, resolve_attention_backend
from ..common.transformer_settings import dense_settings
from ..common.vlm import LanguageSpec, VisionLanguageModel, VisionSpec
from .hf_config import Qwen25VLShape
from .vision import VisionModel


def language_config(shape: Qwen25VLShape, model_config, dims: ParallelDims, fused: bool) -> TransformerConfig:
    text = shape.text
    return TransformerConfig(
        num_layers=text.num_layers, hidden_size=text.hidden_size, ffn_hidden_size=text.intermediate_size,
        num_attention_heads=text.num_heads, num_query_groups=text.num_kv_heads, kv_channels=text.head_dim,
        layernorm_epsilon=text.rms_norm_eps, add_qkv_bias=True,
        mrope_section=text.mrope_section, pipeline_model_parallel_size=dims.pipeline,
        **dense_settings(model_config, dims.tensor, fused, linear_bias=False))


def vision_config(shape: Qwen25VLShape, model_config, dims: ParallelDims, fused: bool) -> TransformerConfig:
    """The tower lives whole on the first pipeline stage, so it sees a pipeline size of 1."""
    vision = shape.vision
    return TransformerConfig(
        num_layers=vision.depth, hidden_size=vision.hidden_size, ffn_hidden_size=vision.intermediate_size,
        num_attention_heads=vision.num_heads, num_query_groups=vision.num_heads, kv_channels=vision.head_dim,
        layernorm_epsilon=1e-6, add_qkv_bias=True, pipeline_model_parallel_size=1,
        **dense_settings(model_config, dims.tensor, fused, linear_bias=True))


def _encode(modules, pixel_values, image_grid_thw, pads):
    return modules["vision_model"](pixel_values, image_grid_thw), {}


def vision_spec(shape: Qwen25VLShape, config: TransformerConfig, backend: str) -> VisionSpec:
    """The tower with its patch merger as one module, `vision_model`; images' and videos' pads take its rows."""
    pads = (shape.image_token_id,) + ((shape.video_token_id,) if shape.video_token_id is not None else ())
    return VisionSpec(
        build=lambda: {"vision_model": VisionModel(config, shape.vision, layer_spec(backend, causal=False))},
        encode=_encode, pad_token_ids=pads, patches_per_token=shape.vision.spatial_merge_size ** 2,
        tower_parameters=("vision_model.layers", "vision_model.patch_embed"),
        projector_parameters=("vision_model.merger",))


def build_qwen2_5_vl(model_config, shape: Qwen25VLShape, dims: ParallelDims, role: str) -> VisionLanguageModel:
    """This rank's stage of `dims` (started) for role "actor"/"reference" (logits) or "critic" (values)."""
    backend = resolve_attention_backend(model_config.attention_backend)
    fused = backend == "te" and torch.cuda.is_available()
    text = shape.text
    config = language_config(shape, model_config, dims, fused)
    language = LanguageSpec(
        config=config, layer_spec=decoder_spec(backend, config),
        vocab_size=padded_vocab_size(text.vocab_size, model_config.make_vocab_size_divisible_by, dims.tensor),
        max_sequence_length=text.max_position_embeddings, position_embedding_type="mrope",
        rotary_base=text.rope_theta, tie_word_embeddings=text.tie_word_embeddings)
    vision = vision_spec(shape, vision_config(shape, model_config, dims, fused), backend)
    model = VisionLanguageModel(language, vision, head_for_role(role, text.vocab_size, dims), dims)
    model.freeze_vision(model_config.freeze_vision_tower, model_config.freeze_merger)
    return model

"""Build this pipeline stage's Qwen3-VL from its geometry: every width comes from config.json.

The language model is megatron-core's GPTModel (QK-norm, no attention biases) with Qwen3-VL's interleaved
M-RoPE (rotary.py) in place of megatron's sectioned one; the first stage also holds the vision tower, whose
merged-patch embeddings replace the <|image_pad|> and <|video_pad|> token embeddings before the decoder and
whose DeepStack features are added at those tokens after the first decoder layers (deepstack.py). Those layers
must therefore sit on the first stage (checked here). The stage module is common/vlm.py's, composed from
these specs.
"""
import torch
import torch.nn.functional as F
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.transformer_block import get_num_layers_to_build

from ...parallel import ParallelDims
from ..common.heads import head_for_role, padded_vocab_size
from ..common.specs import resolve_attention_backend
from ..common.transformer_settings import dense_settings
from ..common.vlm import LanguageSpec, VisionLanguageModel, VisionSpec
from ..errors import ModelError
from .deepstack import deepstack_payload
from .geometry import Qwen3VLGeometry
from .rotary import InterleavedMultimodalRotaryEmbedding
from .specs import language_decoder_spec, vision_layer_spec
from .vision import VisionModel

VISION_ACTIVATIONS = {"gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"), "gelu": F.gelu}


def language_config(geometry: Qwen3VLGeometry, model_config, dims: ParallelDims, fused: bool) -> TransformerConfig:
    text = geometry.text
    return TransformerConfig(
        num_layers=text.num_layers, hidden_size=text.hidden_size, ffn_hidden_size=text.intermediate_size,
        num_attention_heads=text.num_heads, num_query_groups=text.num_kv_heads, kv_channels=text.head_dim,
        layernorm_epsilon=text.rms_norm_eps, add_qkv_bias=False, qk_layernorm=True,
        mrope_section=list(text.mrope_section), pipeline_model_parallel_size=dims.pipeline,
        **dense_settings(model_config, dims.tensor, fused, linear_bias=False))


def vision_config(geometry: Qwen3VLGeometry, model_config, dims: ParallelDims, fused: bool) -> TransformerConfig:
    """The tower lives whole on the first pipeline stage, so it sees a pipeline size of 1."""
    vision = geometry.vision
    settings = dict(dense_settings(model_config, dims.tensor, fused, linear_bias=True), normalization="LayerNorm",
                    gated_linear_unit=False, activation_func=VISION_ACTIVATIONS[vision.hidden_act],
                    bias_activation_fusion=False)
    return TransformerConfig(
        num_layers=vision.depth, hidden_size=vision.hidden_size, ffn_hidden_size=vision.intermediate_size,
        num_attention_heads=vision.num_heads, num_query_groups=vision.num_heads, kv_channels=vision.head_dim,
        layernorm_epsilon=1e-6, add_qkv_bias=True, pipeline_model_parallel_size=1,
        **settings)


def _check_deepstack_on_first_stage(geometry: Qwen3VLGeometry, config: TransformerConfig) -> None:
    """The tower's DeepStack features exist on the first stage only, so the layers they feed must be there."""
    if config.pipeline_model_parallel_size == 1:
        return
    first_stage_layers = get_num_layers_to_build(config, pp_rank=0)
    if first_stage_layers < geometry.deepstack_layers:
        raise ModelError(f"Qwen3-VL adds DeepStack features after decoder layers 0..{geometry.deepstack_layers - 1}, "
                         f"but the first pipeline stage holds {first_stage_layers} layers; lower "
                         "parallel.pipeline so that it holds at least that many")


def _encode(modules, pixel_values, image_grid_thw, pads):
    """The merged embeddings, and the DeepStack features as the decoder's context (deepstack.py)."""
    embeddings, deepstack = modules["vision_model"](pixel_values, image_grid_thw)
    context, context_mask = deepstack_payload(deepstack, pads)
    return embeddings, dict(context=context, context_mask=context_mask)


def vision_spec(geometry: Qwen3VLGeometry, config: TransformerConfig, backend: str) -> VisionSpec:
    """The tower with its merger and DeepStack mergers as one module, `vision_model`."""
    video = (geometry.video_token_id,) if geometry.video_token_id is not None else ()
    return VisionSpec(
        build=lambda: {"vision_model": VisionModel(config, geometry.vision, vision_layer_spec(backend))},
        encode=_encode, pad_token_ids=(geometry.image_token_id,) + video,
        patches_per_token=geometry.vision.spatial_merge_size ** 2,
        tower_parameters=("vision_model.layers", "vision_model.patch_embed", "vision_model.pos_embed"),
        projector_parameters=("vision_model.merger", "vision_model.deepstack_merger_list"))


def build_qwen3_vl(model_config, geometry: Qwen3VLGeometry, dims: ParallelDims, role: str) -> VisionLanguageModel:
    """This rank's stage of `dims` (started) for role "actor"/"reference" (logits) or "critic" (values)."""
    backend = resolve_attention_backend(model_config.attention_backend)
    fused = backend == "te" and torch.cuda.is_available()
    text = geometry.text
    config = language_config(geometry, model_config, dims, fused)
    _check_deepstack_on_first_stage(geometry, config)
    language = LanguageSpec(
        config=config, layer_spec=language_decoder_spec(backend, config),
        vocab_size=padded_vocab_size(text.vocab_size, model_config.make_vocab_size_divisible_by, dims.tensor),
        max_sequence_length=text.max_position_embeddings, position_embedding_type="mrope",
        rotary_base=text.rope_theta, tie_word_embeddings=text.tie_word_embeddings,
        rotary_embedding=lambda: InterleavedMultimodalRotaryEmbedding(
            kv_channels=text.head_dim, rotary_percent=1.0, rotary_base=text.rope_theta))
    vision = vision_spec(geometry, vision_config(geometry, model_config, dims, fused), backend)
    model = VisionLanguageModel(language, vision, head_for_role(role, text.vocab_size, dims), dims)
    model.freeze_vision(model_config.freeze_vision_tower, model_config.freeze_merger)
    return model

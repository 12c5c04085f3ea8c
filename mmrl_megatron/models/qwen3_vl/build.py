"""Build this pipeline stage's Qwen3-VL from its geometry: every width comes from config.json."""
import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.transformer_block import get_num_layers_to_build

from ..common.specs import resolve_attention_backend
from ..errors import ModelError
from ..qwen2_5_vl.build import _common, padded_vocab_size
from .geometry import Qwen3VLGeometry
from .model import Qwen3VLModel
from .specs import language_decoder_spec, vision_layer_spec

VISION_ACTIVATIONS = {"gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"), "gelu": F.gelu}


def language_config(geometry: Qwen3VLGeometry, model_config, fused: bool) -> TransformerConfig:
    text = geometry.text
    return TransformerConfig(
        num_layers=text.num_layers, hidden_size=text.hidden_size, ffn_hidden_size=text.intermediate_size,
        num_attention_heads=text.num_heads, num_query_groups=text.num_kv_heads, kv_channels=text.head_dim,
        layernorm_epsilon=text.rms_norm_eps, add_bias_linear=False, add_qkv_bias=False, qk_layernorm=True,
        mrope_section=list(text.mrope_section),
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
        **_common(model_config, fused))


def vision_config(geometry: Qwen3VLGeometry, model_config, fused: bool) -> TransformerConfig:
    """The tower lives whole on the first pipeline stage, so it sees a pipeline size of 1."""
    vision = geometry.vision
    settings = dict(_common(model_config, fused), normalization="LayerNorm", gated_linear_unit=False,
                    activation_func=VISION_ACTIVATIONS[vision.hidden_act], bias_activation_fusion=False)
    return TransformerConfig(
        num_layers=vision.depth, hidden_size=vision.hidden_size, ffn_hidden_size=vision.intermediate_size,
        num_attention_heads=vision.num_heads, num_query_groups=vision.num_heads, kv_channels=vision.head_dim,
        layernorm_epsilon=1e-6, add_bias_linear=True, add_qkv_bias=True, pipeline_model_parallel_size=1,
        **settings)


def _check_deepstack_on_first_stage(geometry: Qwen3VLGeometry, config: TransformerConfig) -> None:
    """The tower's DeepStack features exist on the first stage only, so the layers they feed must be there."""
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return
    first_stage_layers = get_num_layers_to_build(config, pp_rank=0)
    if first_stage_layers < geometry.deepstack_layers:
        raise ModelError(f"Qwen3-VL adds DeepStack features after decoder layers 0..{geometry.deepstack_layers - 1}, "
                         f"but the first pipeline stage holds {first_stage_layers} layers; lower "
                         "parallel.pipeline so that it holds at least that many")


def build_qwen3_vl(model_config, geometry: Qwen3VLGeometry, role: str) -> Qwen3VLModel:
    """This stage's model for role "actor"/"reference" (logits) or "critic" (values); after init_model_parallel."""
    backend = resolve_attention_backend(model_config.attention_backend)
    fused = backend == "te" and torch.cuda.is_available()
    tensor = parallel_state.get_tensor_model_parallel_world_size()
    language = language_config(geometry, model_config, fused)
    _check_deepstack_on_first_stage(geometry, language)
    model = Qwen3VLModel(
        language, vision_config(geometry, model_config, fused), geometry, role,
        language_decoder_spec(backend, language), vision_layer_spec(backend),
        padded_vocab_size(geometry.text.vocab_size, model_config.make_vocab_size_divisible_by, tensor))
    if model.vision_model is not None:
        vision = model.vision_model
        frozen = [vision.merger, vision.deepstack_merger_list] if model_config.freeze_merger else []
        if model_config.freeze_vision_tower:
            frozen += [vision.layers, vision.patch_embed, vision.pos_embed]
        for module in frozen:
            module.requires_grad_(False)
    return model

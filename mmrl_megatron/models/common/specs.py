"""Transformer-layer specs: megatron-core's local modules with our core attention and RMSNorm, or
Transformer Engine's when it imports. Causal (language model) and bidirectional (vision tower) variants
differ only in the attention mask type, so both come from one function."""
import copy
import warnings

from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec

from .core_attention import TorchCoreAttention
from .norms import RMSNorm


def transformer_engine_available() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_attention_backend(requested: str) -> str:
    """'te' or 'sdpa' for ModelConfig.attention_backend ('auto' picks TE when it imports)."""
    if requested == "auto":
        return "te" if transformer_engine_available() else "sdpa"
    if requested == "te" and not transformer_engine_available():
        raise ImportError("model.attention_backend=te but transformer_engine does not import; use sdpa or auto")
    return requested


def layer_spec(backend: str, causal: bool) -> ModuleSpec:
    """A dense RMSNorm transformer-layer spec; `backend` from resolve_attention_backend."""
    from megatron.core.models.gpt import gpt_layer_specs

    if backend == "te":
        spec = gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(normalization="RMSNorm")
    else:
        with warnings.catch_warnings():  # "Apex is not installed": our norms replace apex's anyway
            warnings.simplefilter("ignore", UserWarning)
            spec = copy.deepcopy(gpt_layer_specs.get_gpt_layer_local_spec(normalization="RMSNorm"))
        spec.submodules.self_attention.submodules.core_attention = TorchCoreAttention
        spec.submodules.input_layernorm = RMSNorm
        spec.submodules.pre_mlp_layernorm = RMSNorm
    spec.submodules.self_attention.params = {"attn_mask_type": AttnMaskType.causal if causal else AttnMaskType.no_mask}
    return spec


def decoder_spec(backend: str, config):
    """This pipeline stage's decoder for GPTModel: causal layers, and for the local spec our RMSNorm as the
    final norm too (given a layer spec alone, megatron-core picks its own fp32-weight norm for it)."""
    spec = layer_spec(backend, causal=True)
    if backend == "te":
        return spec
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    return TransformerBlockSubmodules(layer_specs=[spec] * get_num_layers_to_build(config), layer_norm=RMSNorm)

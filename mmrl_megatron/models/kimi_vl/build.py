"""Build this pipeline stage's Kimi-VL: MoonViT + projector (first pipeline stage, replicated over TP) feeding
the megatron-core MLA/MoE language model (language_model.py). The stage module is common/vlm.py's, composed
from these specs; the media placeholders take the projector's rows."""
import torch

from ...parallel import ParallelDims
from ..common.heads import LogitsHead
from ..common.transformer_settings import DTYPES
from ..common.vlm import VisionLanguageModel, VisionSpec
from ..errors import ModelError
from .hf_config import KimiVLConfig
from .language_model import language_spec, language_transformer_config
from .vision import MoonViT, MultiModalProjector


def _encode(modules, pixel_values, image_grid_thw, pads):
    """[image tokens, text hidden], in image order."""
    return modules["multi_modal_projector"](modules["vision_tower"](pixel_values, image_grid_thw)), {}


def vision_spec(kimi: KimiVLConfig, params_dtype: torch.dtype) -> VisionSpec:
    """`vision_tower` and `multi_modal_projector`, the checkpoint's names."""

    def build():
        # on the CPU they stay where they were built: the CPU, or the meta device for a streamed conversion
        place = dict(dtype=params_dtype, device=torch.cuda.current_device() if torch.cuda.is_available() else None)
        return {"vision_tower": MoonViT(kimi.vision).to(**place),
                "multi_modal_projector": MultiModalProjector(kimi.vision, kimi.text.hidden_size).to(**place)}

    rows, columns = kimi.vision.merge_kernel_size
    return VisionSpec(build=build, encode=_encode, pad_token_ids=(kimi.media_placeholder_token_id,),
                      patches_per_token=rows * columns, tower_parameters=("vision_tower",),
                      projector_parameters=("multi_modal_projector",))


def build_kimi_vl_model(kimi: KimiVLConfig, dims: ParallelDims, params_dtype: torch.dtype = torch.float32,
                        bias_update_rate: float = 0.0, recompute: str = "none") -> VisionLanguageModel:
    """This rank's pipeline stage of `dims` (started) of Kimi-VL, ending in logits."""
    config = language_transformer_config(kimi.text, dims.layout, params_dtype, bias_update_rate, recompute=recompute)
    return VisionLanguageModel(language_spec(kimi.text, config), vision_spec(kimi, params_dtype),
                               LogitsHead(kimi.text.vocab_size, dims.tensor_rank), dims)


def build_kimi_vl(model_config, kimi: KimiVLConfig, dims: ParallelDims, role: str) -> VisionLanguageModel:
    """FAMILY.build for model_type kimi_vl: roles "actor" and "reference" (logits), on the started `dims`.

    model_config is config.ModelConfig (dtype, recompute, freezing, moe_router_bias_update_rate)."""
    if role == "critic":
        raise ModelError("Kimi-VL has no critic head yet: use a critic-free estimator (GRPO, RLOO, REINFORCE++)")
    model = build_kimi_vl_model(kimi, dims, DTYPES[model_config.dtype],
                                model_config.moe_router_bias_update_rate, model_config.recompute)
    model.freeze_vision(model_config.freeze_vision_tower, model_config.freeze_merger)
    return model

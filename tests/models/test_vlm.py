"""The composed vision-language model (models/common/vlm.py) for every family: freezing the vision tower and
the projector stops exactly the vision modules' parameters, and a prompt whose image-pad count differs from
the images' token count stops with a ModelError (pads in responses do not count)."""
import torch

from tests.cpu_ranks import run_on_cpu_ranks

FAMILIES = ("qwen2_5_vl", "qwen3_vl", "kimi_vl")
VISION_MODULES = {"qwen2_5_vl": ("vision_model.",), "qwen3_vl": ("vision_model.",),
                  "kimi_vl": ("vision_tower.", "multi_modal_projector.")}


def _tiny(family):
    """(config.json dict, image-pad id, pixel_values for one 4 x 4-patch image, which gives 4 image tokens)."""
    from mmrl_megatron.models.common.qwen_chat import build_byte_tokenizer
    from mmrl_megatron.models.kimi_vl.tiny import MEDIA_PLACEHOLDER_TOKEN_ID, tiny_config_dict
    from mmrl_megatron.models.qwen2_5_vl.tiny import tiny_config as qwen2_5_vl_config
    from mmrl_megatron.models.qwen3_vl.tiny import tiny_config as qwen3_vl_config

    if family == "kimi_vl":
        return tiny_config_dict(), MEDIA_PLACEHOLDER_TOKEN_ID, torch.randn(16, 3, 14, 14)
    tokenizer = build_byte_tokenizer()
    config = (qwen2_5_vl_config if family == "qwen2_5_vl" else qwen3_vl_config)(tokenizer).to_dict()
    row = 3 * 2 * (14 if family == "qwen2_5_vl" else 16) ** 2  # channels x temporal patch x patch x patch
    return config, tokenizer.convert_tokens_to_ids("<|image_pad|>"), torch.randn(16, row)


def _model(family, config, dims, **model_config):
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from mmrl_megatron.config.schema import ModelConfig
    from mmrl_megatron.models import build_model

    model_parallel_cuda_manual_seed(0)
    return build_model(ModelConfig(dtype="float32", **model_config), config, dims, "actor")


def _pad_error(model, pad_id, pixels, pads, response_pads=0):
    """The ModelError message of a forward over `pads` prompt pads and `response_pads` response pads ('' if none)."""
    from mmrl_megatron.models.errors import ModelError

    ids = torch.tensor([[5, 17] + [pad_id] * pads + [99] + [pad_id] * response_pads])
    prompt_mask = torch.ones_like(ids, dtype=torch.bool)
    prompt_mask[0, 3 + pads:] = False
    positions = torch.arange(ids.shape[1]).expand(3, 1, -1).clone()
    try:
        with torch.no_grad():
            model(ids, positions, pixel_values=pixels, image_grid_thw=torch.tensor([[1, 4, 4]]), prompt_mask=prompt_mask)
    except ModelError as error:
        return str(error)
    return ""


def _check_families():
    from mmrl_megatron.parallel import ParallelDims, start_processes

    dims = start_processes(ParallelDims(world_size=1), torch.device("cpu"))
    found = {}
    for family in FAMILIES:
        config, pad_id, pixels = _tiny(family)
        frozen = _model(family, config, dims, freeze_vision_tower=True, freeze_merger=True)
        trainable = _model(family, config, dims)
        model = trainable.eval()
        found[family] = dict(
            frozen=sorted(name for name, param in frozen.named_parameters() if not param.requires_grad),
            vision=sorted(name for name, _ in frozen.named_parameters() if name.startswith(VISION_MODULES[family])),
            all_train=all(param.requires_grad for param in trainable.parameters()),
            matching=_pad_error(model, pad_id, pixels, pads=4, response_pads=2),
            one_extra=_pad_error(model, pad_id, pixels, pads=5))
    return found


def test_freezing_and_the_image_pad_check_in_every_family():
    """Invariants, per family: freeze_vision_tower + freeze_merger freeze exactly the vision tower's and
    projector's parameters (and nothing else); without them every parameter trains. Four prompt pads for a
    four-token image pass (two more in the response are ordinary tokens); five stop with a ModelError naming
    both counts."""
    [found] = run_on_cpu_ranks(1, _check_families)
    for family in FAMILIES:
        result = found[family]
        assert result["frozen"] == result["vision"] and result["vision"], family
        assert result["all_train"], family
        assert result["matching"] == "", family
        assert "5 image/video-pad tokens" in result["one_extra"] and "describe 4 image tokens" in result["one_extra"], (
            family, result["one_extra"])

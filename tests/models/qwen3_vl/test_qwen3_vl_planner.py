"""The memory planner's Qwen3-VL dimensions count exactly the parameters of transformers' model."""
import pytest
import torch

from mmrl_megatron.models.common.qwen_chat import build_byte_tokenizer
from mmrl_megatron.models.qwen3_vl.geometry import read_geometry
from mmrl_megatron.models.qwen3_vl.tiny import tiny_config


def _numel(module: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())  # tied tensors once, as a checkpoint


@pytest.mark.parametrize("tied", [False, True])
def test_parameter_count_and_split_equal_the_transformers_model(tied):
    """total, language and vision parameter counts equal the tiny Qwen3VLForConditionalGeneration's (vision:
    model.visual with its DeepStack mergers; language: the rest, a tied lm_head counted once)."""
    from transformers import Qwen3VLForConditionalGeneration

    from mmrl_megatron.models.qwen3_vl.planner import planner_dims

    config = tiny_config(build_byte_tokenizer(), tie_word_embeddings=tied)
    with torch.device("meta"):
        model = Qwen3VLForConditionalGeneration(config)
    dims = planner_dims(read_geometry(config.to_dict()), "tiny")
    assert dims.vision_params() == _numel(model.model.visual)
    assert dims.language_params() == _numel(model) - _numel(model.model.visual)
    assert dims.total_params() == _numel(model)

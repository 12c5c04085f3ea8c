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


# totals of the published checkpoints (Hugging Face model pages of Qwen/Qwen3-VL-*-Instruct), in billions
PUBLISHED_BILLIONS = {"qwen3-vl-2b": 2.13, "qwen3-vl-4b": 4.44, "qwen3-vl-8b": 8.77, "qwen3-vl-32b": 33.4}


@pytest.mark.parametrize("name", sorted(PUBLISHED_BILLIONS))
def test_named_shapes_parse_and_count_the_published_sizes(name):
    """The published geometries parse with the family's own reader, resolve from a hub model name (as
    tools/plan.py --model gets it), and count within 1% of the published parameter totals; 2B and 4B tie
    the output layer to the embedding, 8B and 32B do not."""
    from mmrl_megatron.models.planner_dims import resolve_model_dims
    from mmrl_megatron.models.qwen3_vl import FAMILY

    geometry = read_geometry(FAMILY.named_shapes[name])
    size = name.split("-")[-1].upper()
    dims = resolve_model_dims(f"Qwen/Qwen3-VL-{size}-Instruct")
    assert dims.name == name
    assert dims.total_params() / 1e9 == pytest.approx(PUBLISHED_BILLIONS[name], rel=0.01)
    assert geometry.text.tie_word_embeddings == (size in ("2B", "4B"))
    assert geometry.deepstack_layers == 3

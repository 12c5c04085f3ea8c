"""Qwen3-VL's M-RoPE positions equal transformers' Qwen3VLModel.get_rope_index (images of two sizes, text only,
a video whose frames each follow a timestamp), the scoring rule continues them for the response, and a prompt
whose pads do not match image_grid_thw stops with a ModelError; config.json geometry errors name the key."""
import copy

import pytest
import torch

from mmrl_megatron.models.errors import ModelError
from mmrl_megatron.models.qwen3_vl.geometry import read_geometry
from mmrl_megatron.models.qwen3_vl.positions import position_rule, rope_positions
from mmrl_megatron.models.qwen3_vl.tiny import build_tiny_checkpoint
from tests.models.qwen3_vl.inputs import hf_inputs, hf_model, make_samples, mm_token_type_ids


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    import json
    import os

    hf_dir = build_tiny_checkpoint(str(tmp_path_factory.mktemp("qwen3_vl_positions")))
    with open(os.path.join(hf_dir, "config.json")) as handle:
        return hf_dir, json.load(handle)


def test_positions_match_transformers_get_rope_index(checkpoint):
    """Invariant: the prompt positions the trainer scores with are transformers' own, sample by sample."""
    hf_dir, config = checkpoint
    model = hf_model(hf_dir)
    for sample in make_samples(config):
        extra = hf_inputs(sample)
        expected, _ = model.model.get_rope_index(
            sample.ids[None], mm_token_type_ids(model, sample.ids), extra.get("image_grid_thw"),
            extra.get("video_grid_thw"))
        assert torch.equal(sample.positions, expected[:, 0]), sample.ids


def test_response_positions_continue_after_the_prompt(checkpoint):
    """Invariant: response token k sits at max(prompt positions) + 1 + k on all three axes."""
    _, config = checkpoint
    geometry = read_geometry(config)
    sample = make_samples(config)[0]
    positions = position_rule(geometry)(sample.ids.tolist(), 4, sample.grid_thw)
    start = int(sample.positions.max()) + 1
    assert torch.equal(positions[:, :sample.ids.numel()], sample.positions)
    assert torch.equal(positions[:, sample.ids.numel():], torch.arange(start, start + 4).expand(3, -1))


def test_pads_that_do_not_match_the_grid_are_an_error(checkpoint):
    """Invariant: a prompt whose image pads disagree with image_grid_thw is refused, not mispositioned."""
    _, config = checkpoint
    geometry = read_geometry(config)
    sample = make_samples(config)[0]
    with pytest.raises(ModelError, match="does not match its grid"):
        rope_positions(sample.ids, sample.grid_thw.flip(0), geometry)
    with pytest.raises(ModelError, match="more images"):
        rope_positions(sample.ids, sample.grid_thw[:1], geometry)


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["text_config"]["rope_parameters"].update(mrope_section=[3, 3, 3]), "mrope_section"),
    (lambda c: c["text_config"].pop("num_hidden_layers"), "num_hidden_layers"),
    (lambda c: c["vision_config"].update(num_position_embeddings=15), "num_position_embeddings"),
    (lambda c: c["vision_config"].update(deepstack_visual_indexes=[0, 7]), "deepstack_visual_indexes"),
])
def test_config_errors_name_the_key(checkpoint, edit, message):
    """Invariant: a config.json that does not describe a Qwen3-VL fails with one line naming the key."""
    _, config = checkpoint
    broken = copy.deepcopy(config)
    edit(broken)
    with pytest.raises(ModelError, match=message):
        read_geometry(broken)


# Qwen/Qwen3-VL-8B-Instruct's config.json layout (transformers 4.57): rope_scaling and rope_theta in text_config
PUBLISHED_8B = {
    "model_type": "qwen3_vl", "image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652,
    "vision_end_token_id": 151653, "tie_word_embeddings": False,
    "text_config": {"head_dim": 128, "hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36,
                    "num_attention_heads": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-6,
                    "rope_scaling": {"mrope_interleaved": True, "mrope_section": [24, 20, 20], "rope_type": "default"},
                    "rope_theta": 5000000, "vocab_size": 151936, "max_position_embeddings": 262144},
    "vision_config": {"deepstack_visual_indexes": [8, 16, 24], "depth": 27, "hidden_act": "gelu_pytorch_tanh",
                      "hidden_size": 1152, "intermediate_size": 4304, "num_heads": 16, "num_position_embeddings": 2304,
                      "out_hidden_size": 4096, "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2},
}


def test_published_layout_reads_rope_scaling_and_rope_theta():
    """Invariant: the hub's 4.57-era layout gives the same geometry fields as transformers 5's rope_parameters."""
    geometry = read_geometry(PUBLISHED_8B)
    assert (geometry.text.rope_theta, geometry.text.mrope_section, geometry.text.head_dim) == (5e6, (24, 20, 20), 128)
    assert geometry.vision.position_grid_side == 48 and geometry.deepstack_layers == 3
    nested = copy.deepcopy(PUBLISHED_8B)
    text = nested["text_config"]
    text["rope_parameters"] = dict(text.pop("rope_scaling"), rope_theta=text.pop("rope_theta"))
    assert read_geometry(nested) == geometry

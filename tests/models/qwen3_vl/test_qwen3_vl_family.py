"""Qwen3-VL's FAMILY: the registry finds it, importing the package stays cheap, and its fields reach the
family's modules."""
import subprocess
import sys

import torch

from mmrl_megatron.models.common.qwen_chat import build_byte_tokenizer
from mmrl_megatron.models.family import family_for
from mmrl_megatron.models.qwen3_vl import FAMILY
from mmrl_megatron.models.qwen3_vl.positions import rope_positions
from mmrl_megatron.models.qwen3_vl.tiny import tiny_config


def test_importing_the_package_loads_neither_megatron_nor_transformers():
    """The registry imports every family package: models/qwen3_vl/__init__ must not pull in the heavy stacks."""
    code = ("import sys, mmrl_megatron.models.qwen3_vl as f; f.FAMILY.model_type; "
            "print(sorted(m for m in ('megatron', 'transformers') if m in sys.modules))")
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert output.strip() == "[]"


def test_geometry_and_positions_fields_are_the_familys():
    """A Qwen3-VL config.json finds FAMILY in the registry; its geometry parses the dict and its positions
    continue the prompt's get_rope_index positions with the response."""
    config = tiny_config(build_byte_tokenizer())
    assert family_for(config.to_dict()) is FAMILY
    geometry = FAMILY.geometry(config.to_dict())
    ids = [10, config.vision_start_token_id] + [config.image_token_id] * 4 + [config.vision_end_token_id, 11]
    grid = torch.tensor([[1, 4, 4]])
    positions = FAMILY.positions(geometry)(ids, 3, grid)
    prompt = rope_positions(ids, grid, geometry)
    assert torch.equal(positions[:, :len(ids)], prompt)
    assert torch.equal(positions[:, len(ids):], (prompt.max() + 1 + torch.arange(3)).expand(3, 3))

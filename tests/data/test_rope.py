"""rope_positions must equal transformers' Qwen2.5-VL get_rope_index, so the trainer's positions match the model's."""
import pytest
import torch
from transformers import AutoConfig, Qwen2_5_VLModel

from mmrl_megatron.config.schema import DataConfig
from mmrl_megatron.data import PromptProcessor, rope_positions
from mmrl_megatron.data.format import make_row, parse_row
from tests.data.images import png


@pytest.mark.parametrize("sizes", [[], [(56, 56)], [(56, 56), (112, 84), (56, 112)]])
def test_rope_positions_equal_transformers(tiny_model_dir, sizes):
    """Invariant: for 0, 1 and 3 images of different sizes (plus a response after the prompt), our [3, T]
    positions equal get_rope_index's, token for token."""
    processor = PromptProcessor(tiny_model_dir, DataConfig(max_prompt_length=4096))
    sample = processor.process(parse_row(make_row("Compare the shapes.", [png(w, h) for w, h in sizes], "1", "t")), 0)
    response = processor.tokenizer.encode("<think>two</think> \\boxed{1}<|im_end|>", add_special_tokens=False)
    ids = torch.tensor([sample.prompt_ids + response])
    ours = rope_positions(ids[0], sample.image_grid_thw, processor.merge_size, processor.image_token_id,
                          processor.vision_start_token_id)

    config = AutoConfig.from_pretrained(tiny_model_dir)
    reference = Qwen2_5_VLModel(config)
    token_types = (ids == config.image_token_id).int()
    expected, _ = reference.get_rope_index(ids, mm_token_type_ids=token_types, image_grid_thw=sample.image_grid_thw)
    assert len(sizes) == (0 if sample.image_grid_thw is None else sample.image_grid_thw.shape[0])
    assert ours.shape == (3, ids.shape[1])
    assert torch.equal(ours, expected[:, 0])
    if sizes:
        assert not torch.equal(ours[0], ours[1])  # images really took 3D positions


def test_rope_positions_reject_grid_mismatch():
    """Invariant: a grid count that disagrees with the image tokens is an error, not silently wrong positions."""
    ids = torch.tensor([5, 10, 11, 11, 11, 11, 12, 6])
    with pytest.raises(ValueError):
        rope_positions(ids, torch.tensor([[1, 4, 4], [1, 2, 2]]), 2, image_token_id=11, vision_start_token_id=10)
    with pytest.raises(ValueError):
        rope_positions(ids, torch.tensor([[1, 4, 6]]), 2, image_token_id=11, vision_start_token_id=10)

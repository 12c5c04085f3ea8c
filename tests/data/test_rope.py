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


def test_text_positions_are_rope_positions_without_images():
    """Invariant: the engines' text-only shortcut gives rope_positions' positions for a prompt with no vision
    tokens: the token index on all three rows."""
    from mmrl_megatron.models.common.rope import text_positions

    ids = torch.arange(100, 137)
    assert torch.equal(text_positions(37), rope_positions(ids, None, 2, 151655, 151652))


def test_rope_positions_reject_grid_mismatch():
    """Invariant: a grid count that disagrees with the image tokens is an error, not silently wrong positions."""
    ids = torch.tensor([5, 10, 11, 11, 11, 11, 12, 6])
    with pytest.raises(ValueError):
        rope_positions(ids, torch.tensor([[1, 4, 4], [1, 2, 2]]), 2, image_token_id=11, vision_start_token_id=10)
    with pytest.raises(ValueError):
        rope_positions(ids, torch.tensor([[1, 4, 6]]), 2, image_token_id=11, vision_start_token_id=10)


@pytest.mark.parametrize("frames,sample_fps", [(8, 2.0), (6, 3.0), (5, 0.7)])
def test_video_positions_equal_transformers(tiny_model_dir, frames, sample_fps):
    """Invariant: with an image, a video of several temporal patches and another image in one prompt (plus a
    response), our positions equal get_rope_index's given video_grid_thw and second_per_grid_ts, token for token;
    the video's temporal positions are spaced by tokens_per_second x seconds per temporal patch (fractional
    spacings truncated as transformers does)."""
    from mmrl_megatron.config.schema import VideoConfig
    from tests.data.videos import frame_arrays, png_frames

    processor = PromptProcessor(tiny_model_dir, DataConfig(max_prompt_length=4096, video=VideoConfig(
        min_pixels=56 * 56, max_pixels=56 * 84)))
    row = make_row("", [png(56, 56), png(112, 56)], "1", "t",
                   videos=[{"video": png_frames(frame_arrays(frames, 56, 84)), "sample_fps": sample_fps}])
    row["prompt"] = [{"role": "user", "content": "<image>first<video>then<image>which?"}]
    sample = processor.process(parse_row(row), 0)
    response = processor.tokenizer.encode("<think>two</think> \\boxed{1}<|im_end|>", add_special_tokens=False)
    ids = torch.tensor([sample.prompt_ids + response])
    config = AutoConfig.from_pretrained(tiny_model_dir)
    tokens_per_second = config.vision_config.tokens_per_second
    ours = rope_positions(ids[0], sample.image_grid_thw, processor.merge_size, processor.image_token_id,
                          processor.vision_start_token_id, processor.video_token_id, sample.second_per_grid_ts,
                          tokens_per_second)

    is_video = torch.tensor([False, True, False])  # the grid rows in prompt order: image, video, image
    token_types = (ids == config.image_token_id).int() + 2 * (ids == config.video_token_id).int()
    expected, _ = Qwen2_5_VLModel(config).get_rope_index(
        ids, mm_token_type_ids=token_types, image_grid_thw=sample.image_grid_thw[~is_video],
        video_grid_thw=sample.image_grid_thw[is_video], second_per_grid_ts=torch.tensor(sample.second_per_grid_ts))
    assert torch.equal(ours, expected[:, 0])
    grid_t = (frames + 1) // 2
    video_start = sample.prompt_ids.index(processor.video_token_id)
    temporal = ours[0, video_start:video_start + sample.prompt_ids.count(processor.video_token_id)]
    step = tokens_per_second * 2 / sample_fps
    assert (temporal.unique() - temporal[0]).tolist() == [int(k * step) for k in range(grid_t)]

"""Rows with videos through PromptProcessor and PromptDataset (Qwen2.5-VL): each <|video_pad|> expanded to its
video's tokens, the patches of images and videos concatenated in prompt order, the span kept whole when text is
truncated, bad videos counted as skipped rows naming file and row, and families without videos refusing them."""
import logging

import pytest
import torch

from mmrl_megatron.config.schema import DataConfig, VideoConfig
from mmrl_megatron.data import PromptDataset, PromptProcessor
from mmrl_megatron.data.errors import SkippedRow
from mmrl_megatron.data.format import make_row, parse_row, write_rows
from mmrl_megatron.data.images import decode_images
from mmrl_megatron.data.videos import parse_videos
from tests.data.images import png
from tests.data.videos import encoded_clip, frame_arrays, png_frames

VIDEO = VideoConfig(min_pixels=56 * 56, max_pixels=56 * 84)


@pytest.fixture(scope="module")
def processor(tiny_model_dir):
    return PromptProcessor(tiny_model_dir, DataConfig(max_prompt_length=400, video=VIDEO))


def _row(prompt: str, images, videos):
    return {**make_row("", images, "1", "unit"), "prompt": [{"role": "user", "content": prompt}], "videos": videos}


def test_images_and_videos_take_their_patches_in_prompt_order(processor):
    """Invariant: for image, video, image in a prompt, pixel_values is [image 0, video, image 1] patches (each as
    its own processor gives them alone), the grid rows follow the same order, each pad is expanded to its item's
    token count, and second_per_grid_ts holds the video's temporal_patch_size / sample_fps."""
    images = [png(56, 56), png(112, 56)]
    frames = {"video": png_frames(frame_arrays(6, 56, 84)), "sample_fps": 3}
    sample = processor.process(parse_row(_row("<image>first<video>then<image>which?", images, [frames])), 0)
    first, second = (processor.image_processor([image]) for image in decode_images(images))
    video = processor.process_video(parse_videos([frames])[0])
    assert torch.equal(sample.pixel_values, torch.cat([first.pixel_values, video.pixel_values, second.pixel_values]))
    assert sample.image_grid_thw.tolist() == [*first.image_grid_thw.tolist(), [3, 4, 6], *second.image_grid_thw.tolist()]
    assert video.grid_thw.tolist() == [[3, 4, 6]]  # 6 frames at 56x84: 3 temporal patches of 4x6 patches
    assert sample.prompt_ids.count(processor.video_token_id) == video.tokens == 3 * 4 * 6 // 4
    assert sample.prompt_ids.count(processor.image_token_id) == first.tokens_per_image[0] + second.tokens_per_image[0]
    assert sample.second_per_grid_ts == [pytest.approx(2 / 3)]
    assert sample.prompt_text.count("<|video_pad|>") == 1


def test_truncation_keeps_the_video_span(tiny_model_dir):
    """Invariant: data.overlong_prompt=truncate removes text only; the video's pads survive whole and the
    prompt text keeps one <|video_pad|> for the video."""
    truncating = PromptProcessor(tiny_model_dir, DataConfig(max_prompt_length=120, overlong_prompt="truncate",
                                                            video=VIDEO))
    row = _row("words " * 60 + "<video>" + "words " * 60, [], [png_frames(frame_arrays(2, 56, 84))])
    sample = truncating.process(parse_row(row), 0)
    assert sample.truncated and len(sample.prompt_ids) == 120
    assert sample.prompt_ids.count(truncating.video_token_id) == 6
    assert sample.prompt_text.count("<|video_pad|>") == 1


def test_bad_videos_are_counted_and_named_by_file_and_row(tmp_path, processor, caplog):
    """Invariant: a corrupt clip and a frame that is no image are skipped rows, warned about with file and row and
    counted under their reason; the good video rows (frames and an encoded clip) load."""
    clip = encoded_clip(frame_arrays(8, 56, 84), 4)
    good_frames = {"bytes": None, "video": png_frames(frame_arrays(4, 56, 84))}
    rows = [_row("<video>a?", [], [good_frames]), _row("<video>b?", [], [{"bytes": clip[:200], "video": None}]),
            _row("<video>c?", [], [{"bytes": None, "video": [b"not a png"] * 2}]),
            _row("<video>d?", [], [{"bytes": clip, "video": None}])]
    path = tmp_path / "videos.parquet"
    write_rows(str(path), rows)
    dataset = PromptDataset([str(path)], processor.config, "", 4, processor=processor, train=False)
    with caplog.at_level(logging.WARNING):
        samples = [sample for batch in dataset for sample in batch]
    assert [sample.index for sample in samples] == [0, 3]
    assert [sample.image_grid_thw.tolist() for sample in samples] == [[[2, 4, 6]], [[2, 4, 6]]]
    counts = dataset.metrics()
    assert counts["data/skipped_undecodable_video"] == 2 and counts["data/skipped_total"] == 2
    assert f"{path} row 1 skipped (undecodable_video): video 0: " in caplog.text
    assert f"{path} row 2 skipped (undecodable_video): video 0 frame 0 cannot be decoded" in caplog.text


def test_family_without_videos_skips_video_rows(tiny_kimi_vl_dir):
    """Invariant: Kimi-VL takes no videos: a row with one is skipped (video_unsupported), not processed as text."""
    kimi = PromptProcessor(tiny_kimi_vl_dir, DataConfig(video=VIDEO))
    with pytest.raises(SkippedRow) as raised:
        kimi.process(parse_row(_row("<video>what?", [], [png_frames(frame_arrays(2, 56, 84))])), 0)
    assert raised.value.reason == "video_unsupported"


def test_video_placeholders_must_match_the_videos():
    """Invariant: more <video> placeholders than videos is a counted mismatch; a row without placeholders gets
    its videos after its images, before the text."""
    frames = png_frames(frame_arrays(2, 28, 28))
    with pytest.raises(SkippedRow) as raised:
        parse_row(_row("<video><video>two?", [], [frames]))
    assert raised.value.reason == "video_count_mismatch"
    parsed = parse_row(_row("<image>one?", [png(28, 28)], [frames]))
    assert [part["type"] for part in parsed.messages[0]["content"]] == ["image", "video", "text"]

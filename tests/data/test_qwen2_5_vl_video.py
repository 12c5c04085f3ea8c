"""Qwen2.5-VL's video patches (models/qwen2_5_vl/video.py) are transformers' Qwen2VLVideoProcessor's.

The oracle needs torchvision, which imports only on the GPU machine (run there: pytest
tests/data/test_qwen2_5_vl_video.py); on CPU machines the invariants below it pin the layout: a still video is
the image processor's image, and each frame lands in its own temporal slot."""
import numpy as np
import pytest
import torch
from PIL import Image

from mmrl_megatron.config.schema import DataConfig, VideoConfig
from mmrl_megatron.data.videos import VideoEntry, load_video
from mmrl_megatron.models.qwen2_5_vl.video import Qwen2_5_VLVideoProcessor
from tests.data.videos import frame_arrays, png_frames

VIDEO = VideoConfig(min_pixels=56 * 56, max_pixels=56 * 84)  # the frames below keep their 56 x 84 size


def _process(processor, frames):
    """The data path's steps for one video: sample and size its frames, then the family's processor."""
    video = load_video(VideoEntry(frames=png_frames(frames)), VIDEO, processor.frame_factor,
                       processor.temporal_patch_size)
    return processor(video)


@pytest.fixture(scope="module")
def processor(tiny_model_dir):
    return Qwen2_5_VLVideoProcessor(tiny_model_dir, DataConfig(video=VIDEO))


@pytest.mark.parametrize("count", [6, 5])
def test_patches_equal_transformers_video_processor(tiny_model_dir, processor, count):
    """Invariant: for 6 frames and for 5 (padded with the last), our patches and grid equal transformers'
    Qwen2VLVideoProcessor's on the same frames (already at the video's size, so neither resizes), to 1e-6."""
    pytest.importorskip("torchvision")
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    frames = frame_arrays(count, 56, 84)
    ours = _process(processor, frames)
    reference = Qwen2VLVideoProcessor.from_pretrained(tiny_model_dir)
    expected = reference(videos=[np.stack(frames)], do_sample_frames=False, return_tensors="pt")
    assert ours.grid_thw.tolist() == expected["video_grid_thw"].tolist()
    torch.testing.assert_close(ours.pixel_values, expected["pixel_values_videos"], rtol=0, atol=1e-6)


def test_still_video_is_the_image(processor):
    """Invariant: two identical frames make the patches the image processor makes of that one image (an image
    is a temporal patch of one frame repeated)."""
    frame = frame_arrays(1, 56, 84)[0]
    video = _process(processor, [frame, frame])
    image = processor.image_processor(images=[Image.fromarray(frame)], return_tensors="pt")
    assert video.grid_thw.tolist() == image["image_grid_thw"].tolist()
    assert torch.equal(video.pixel_values, image["pixel_values"])


def test_each_frame_fills_its_own_temporal_slot(processor):
    """Invariant: in temporal patch g, slot s holds frame 2g + s: the patches of a 4-frame video are those of
    still videos of its frames, slot by slot."""
    frames = frame_arrays(4, 56, 84)
    video = _process(processor, frames)
    patch = processor.patch_size
    slots = video.pixel_values.view(2, 24, 3, 2, patch, patch)
    for number, frame in enumerate(frames):
        still = _process(processor, [frame, frame]).pixel_values.view(24, 3, 2, patch, patch)
        assert torch.equal(slots[number // 2, :, :, number % 2], still[:, :, 0])
    assert video.tokens == 2 * 24 // 4 and video.second_per_grid_t == 2 / VIDEO.fps

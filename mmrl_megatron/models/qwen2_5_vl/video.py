"""Qwen2.5-VL's video processing: the frames data/videos.py samples and sizes (to multiples of frame_factor
pixels, temporal_patch_size frames at a time), normalised and cut into patches by
transformers' own image processor, temporal_patch_size frames to a patch.

transformers' Qwen2VLVideoProcessor needs torchvision, which has no build beside the CPU torch. Its patch rows
are the image processor's, except that the temporal axis holds successive frames where an image's holds one
frame repeated; so every frame goes through the image processor (do_resize=False: the frames already have the
video's size) and the temporal slots are filled frame by frame. tests/data/test_qwen2_5_vl_video.py compares
the result with Qwen2VLVideoProcessor where torchvision imports.
"""
import torch

from ..common.media import ProcessedVideo, SkippedRow


class Qwen2_5_VLVideoProcessor:
    """Callable on one sampled video (its `frames`, PIL images sized by the data path, and `sample_fps`) ->
    ProcessedVideo; SkippedRow when the image processor rejects it."""

    def __init__(self, model_dir: str, data_config):
        from transformers import AutoImageProcessor

        self.image_processor = AutoImageProcessor.from_pretrained(model_dir)
        self.patch_size = self.image_processor.patch_size
        self.merge_size = self.image_processor.merge_size
        self.temporal_patch_size = self.image_processor.temporal_patch_size
        self.frame_factor = self.patch_size * self.merge_size  # frame sides are multiples of it

    def __call__(self, video, what: str = "video") -> ProcessedVideo:
        temporal, patch = self.temporal_patch_size, self.patch_size
        try:
            processed = self.image_processor(images=video.frames, do_resize=False, return_tensors="pt")
        except (ValueError, RuntimeError) as error:
            raise SkippedRow("unprocessable_video", f"{what}: image processor rejected its frames: {error}") from error
        _, height, width = processed["image_grid_thw"][0].tolist()
        frames = processed["pixel_values"]  # [frames * height * width, channels * temporal * patch * patch]
        grid_t = len(video.frames) // temporal
        # [grid_t, frame in patch, row, channels, temporal slot, patch, patch]; every slot of a frame's row is
        # that frame, so slot 0 is kept and the frames become the temporal axis
        frames = frames.view(grid_t, temporal, height * width, -1, temporal, patch, patch)[:, :, :, :, 0]
        patches = frames.permute(0, 2, 3, 1, 4, 5).reshape(grid_t * height * width, -1)
        return ProcessedVideo(patches, torch.tensor([[grid_t, height, width]]),
                              grid_t * height * width // self.merge_size ** 2, temporal / video.sample_fps)

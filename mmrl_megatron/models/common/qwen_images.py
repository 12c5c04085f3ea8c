"""Image processing for the Qwen families (Qwen2.5-VL and Qwen3-VL share Qwen2-VL's image processor, at
their own patch sizes): transformers' own image processor (AutoImageProcessor) under data.min_pixels and
data.max_pixels.

transformers' Qwen2_5_VLProcessor cannot be constructed without torchvision, so the image processor is
loaded alone; each image stands for grid_t * grid_h * grid_w / merge_size^2 image pads, as that processor
counts them.
"""
from typing import List

from .media import ProcessedImages, SkippedRow


class QwenImageProcessor:
    """Callable on a prompt's PIL images -> ProcessedImages; SkippedRow("unprocessable_image") when rejected."""

    def __init__(self, model_dir: str, data_config):
        from transformers import AutoImageProcessor

        # min_pixels/max_pixels keys in preprocessor_config.json override `size`, so pass them too
        self.image_processor = AutoImageProcessor.from_pretrained(
            model_dir, size={"shortest_edge": data_config.min_pixels, "longest_edge": data_config.max_pixels},
            min_pixels=data_config.min_pixels, max_pixels=data_config.max_pixels)
        self.merge_size = self.image_processor.merge_size

    def __call__(self, images: List) -> ProcessedImages:
        try:
            processed = self.image_processor(images=images, return_tensors="pt")
        except (ValueError, RuntimeError) as error:
            raise SkippedRow("unprocessable_image", f"image processor rejected the images: {error}") from error
        grid = processed["image_grid_thw"].long()
        return ProcessedImages(processed["pixel_values"], grid, (grid.prod(dim=-1) // self.merge_size ** 2).tolist())

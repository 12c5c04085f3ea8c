"""Kimi-VL's image processing, written here because transformers has no kimi_vl processor: the published one
(moonshotai/Kimi-VL-A3B-*: image_processing_kimi_vl.py, KimiVLImageProcessor) is remote code needing torchvision.

Per image, as that processor does with pad_input=true (what published checkpoints set):
1. when (w // 14) * (h // 14) exceeds the patch limit, down-scale (PIL bicubic) both sides by
   sqrt(limit / that count), truncating to whole pixels;
2. pad right and bottom with black to multiples of patch_size * merge_kernel_size (28 x 28);
3. scale to [0, 1], then normalise with image_mean / image_std;
4. cut into 3 x 14 x 14 patches, row-major: the pixel_values rows models/kimi_vl/vision.py's MoonViT takes,
   with grid (1, rows, cols) in patches. The image stands for rows * cols / 4 = ceil(h / 28) * ceil(w / 28)
   <|media_pad|> tokens (h, w after step 1).

Settings come from the checkpoint's preprocessor_config.json; where a key is absent the published class's
default applies: patch_size 14, merge_kernel_size [2, 2], in_token_limit 4096, image_mean / image_std
OpenAI CLIP's (0.48145466, 0.4578275, 0.40821073) / (0.26862954, 0.26130258, 0.27577711).
data.max_pixels lowers the limit to max_pixels // patch_size^2 patches when that is smaller than
in_token_limit (it never raises it: SGLang's server runs the published processor on the same images).
data.min_pixels does not apply: the published processor never enlarges an image; padding already gives the
smallest image one token.
"""
import json
import math
import os
from dataclasses import dataclass
from typing import List, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from ..common.media import ProcessedImages, SkippedRow
from ..errors import ModelError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_PATCHES_PER_SIDE = 512  # MoonViT's 2-D rotary table in the published model is 512 x 512 patches


@dataclass(frozen=True)
class KimiVLImageProcessor:
    """Callable on a prompt's PIL images -> ProcessedImages with pixel_values [patches, 3, p, p] float32."""

    patch_limit: int
    patch_size: int = 14
    merge_kernel_size: Tuple[int, int] = (2, 2)
    image_mean: Tuple[float, ...] = CLIP_MEAN
    image_std: Tuple[float, ...] = CLIP_STD

    @property
    def merge_size(self) -> int:
        """Patches merged per image token along each side (published kernels are square: 2 x 2)."""
        return self.merge_kernel_size[0]

    @classmethod
    def from_pretrained(cls, model_dir: str, data_config) -> "KimiVLImageProcessor":
        path = os.path.join(model_dir, "preprocessor_config.json")
        if not os.path.isfile(path):
            raise ModelError(f"{path} not found: a Kimi-VL checkpoint directory carries its processor settings there")
        with open(path) as handle:
            settings = json.load(handle)
        if not settings.get("pad_input", False):
            raise ModelError(f"{path}: pad_input is not true; only the padding mode of the published Kimi-VL "
                            "checkpoints is implemented (set \"pad_input\": true)")
        patch_size = int(settings.get("patch_size", 14))
        patch_limit = min(int(settings.get("in_token_limit", 4096)), data_config.max_pixels // patch_size ** 2)
        return cls(patch_limit=patch_limit, patch_size=patch_size,
                   merge_kernel_size=tuple(settings.get("merge_kernel_size", (2, 2))),
                   image_mean=tuple(settings.get("image_mean", CLIP_MEAN)),
                   image_std=tuple(settings.get("image_std", CLIP_STD)))

    def resize_and_pad(self, image: Image.Image) -> Image.Image:
        """Steps 1 and 2: the image the patches are cut from (RGB, sides multiples of patch * merge kernel)."""
        width, height = image.size
        patches = (width // self.patch_size) * (height // self.patch_size)
        if patches > self.patch_limit:
            scale = math.sqrt(self.patch_limit / patches)
            # at least one pixel a side, where the published processor would fail on an extreme aspect ratio
            size = (max(1, int(width * scale)), max(1, int(height * scale)))
            image = image.resize(size, Image.Resampling.BICUBIC)
        width, height = image.size
        block_rows, block_cols = (kernel * self.patch_size for kernel in self.merge_kernel_size)
        padded = Image.new("RGB", (-(-width // block_cols) * block_cols, -(-height // block_rows) * block_rows))
        padded.paste(image.convert("RGB"), (0, 0))
        return padded

    def patchify(self, image: Image.Image) -> torch.Tensor:
        """Steps 3 and 4: [rows * cols, 3, p, p] normalised patches, row-major."""
        pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float().div(255)
        mean, std = (torch.tensor(values).view(3, 1, 1) for values in (self.image_mean, self.image_std))
        pixels = (pixels - mean) / std
        p = self.patch_size
        rows, cols = pixels.shape[1] // p, pixels.shape[2] // p
        return pixels.view(3, rows, p, cols, p).permute(1, 3, 0, 2, 4).reshape(rows * cols, 3, p, p)

    def __call__(self, images: Sequence[Image.Image]) -> ProcessedImages:
        all_patches: List[torch.Tensor] = []
        grids = []
        for number, image in enumerate(images):
            padded = self.resize_and_pad(image)
            rows, cols = padded.height // self.patch_size, padded.width // self.patch_size
            if max(rows, cols) >= MAX_PATCHES_PER_SIDE:
                raise SkippedRow("unprocessable_image", f"image {number} is {rows}x{cols} patches after resizing; "
                                 f"Kimi-VL's position embedding allows fewer than {MAX_PATCHES_PER_SIDE} a side")
            all_patches.append(self.patchify(padded))
            grids.append([1, rows, cols])
        merged = self.merge_kernel_size[0] * self.merge_kernel_size[1]
        return ProcessedImages(torch.cat(all_patches), torch.tensor(grids, dtype=torch.long),
                               [rows * cols // merged for _, rows, cols in grids])

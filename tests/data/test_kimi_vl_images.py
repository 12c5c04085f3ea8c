"""Kimi-VL's image processing (models/kimi_vl/images.py): the published processor's down-scaling, padding to
28-pixel blocks, normalisation and row-major 3x14x14 patches, and the settings it reads."""
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from mmrl_megatron.config.schema import DataConfig
from mmrl_megatron.data.errors import SkippedRow
from mmrl_megatron.models.errors import ModelError
from mmrl_megatron.models.kimi_vl.images import CLIP_MEAN, KimiVLImageProcessor

MEAN, STD = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)


def _noise(width: int, height: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


def _expected_patches(image: Image.Image, resized_size) -> torch.Tensor:
    """The patches computed directly: resize (if asked), black canvas padded to 28s, normalise, cut row by row."""
    if resized_size != image.size:
        image = image.resize(resized_size, Image.Resampling.BICUBIC)
    width, height = image.size
    canvas = np.zeros((math.ceil(height / 28) * 28, math.ceil(width / 28) * 28, 3), dtype=np.float32)
    canvas[:height, :width] = np.asarray(image, dtype=np.float32) / 255
    normalised = (canvas - np.array(MEAN, dtype=np.float32)) / np.array(STD, dtype=np.float32)
    rows, cols = canvas.shape[0] // 14, canvas.shape[1] // 14
    patches = [normalised[r * 14:(r + 1) * 14, c * 14:(c + 1) * 14].transpose(2, 0, 1)
               for r in range(rows) for c in range(cols)]
    return torch.from_numpy(np.stack(patches))


@pytest.mark.parametrize("size, grid", [((56, 56), (4, 4)), ((70, 42), (4, 6)), ((15, 100), (8, 2)),
                                        ((29, 29), (4, 4))])
def test_images_pad_to_whole_merge_blocks(size, grid):
    """Invariant: an image within the patch limit keeps its size and is padded up to multiples of 28 pixels,
    giving a (1, rows, cols) grid, rows * cols patch rows of 3x14x14 and ceil(h/28) * ceil(w/28) tokens."""
    width, height = size
    processed = KimiVLImageProcessor(patch_limit=4096)([_noise(width, height)])
    assert processed.image_grid_thw.tolist() == [[1, *grid]]
    assert processed.pixel_values.shape == (grid[0] * grid[1], 3, 14, 14)
    assert processed.tokens_per_image == [math.ceil(height / 28) * math.ceil(width / 28)]


def test_large_image_is_down_scaled_under_the_patch_limit():
    """Invariant: a 300x200 image (21 x 14 = 294 whole patches) under a limit of 64 is scaled by
    sqrt(64 / 294) to 139x93 pixels, as the published processor truncates, then padded to 140x112: 8x10 patches,
    20 tokens."""
    processor = KimiVLImageProcessor(patch_limit=64)
    assert processor.resize_and_pad(_noise(300, 200)).size == (140, 112)
    processed = processor([_noise(300, 200)])
    assert processed.image_grid_thw.tolist() == [[1, 8, 10]]
    assert processed.tokens_per_image == [20]
    assert (139 // 14) * (93 // 14) <= 64


def test_pixel_rows_equal_a_direct_computation():
    """Invariant: for a non-multiple-of-28 image and a down-scaled one in one call, pixel_values are both
    images' normalised patches, row-major, concatenated in order; the padding is black normalised."""
    processor = KimiVLImageProcessor(patch_limit=64, image_mean=MEAN, image_std=STD)
    small, large = _noise(45, 30, seed=1), _noise(300, 200, seed=2)
    processed = processor([small, large])
    expected = torch.cat([_expected_patches(small, (45, 30)), _expected_patches(large, (139, 93))])
    torch.testing.assert_close(processed.pixel_values, expected, rtol=0, atol=1e-6)
    assert processed.image_grid_thw.tolist() == [[1, 4, 4], [1, 8, 10]]
    assert processed.tokens_per_image == [4, 20]
    corner = processed.pixel_values[15, :, -1, -1]  # bottom-right patch of the first image lies in the padding
    torch.testing.assert_close(corner, -torch.tensor(MEAN) / torch.tensor(STD))


def test_patches_beyond_the_position_table_skip_the_row():
    """Invariant: an image 516 patches wide (under the patch limit, so not down-scaled) is a counted skip,
    as the published model's 512-patch position table cannot take it."""
    with pytest.raises(SkippedRow) as raised:
        KimiVLImageProcessor(patch_limit=4096)([_noise(7200, 14)])
    assert raised.value.reason == "unprocessable_image"


def _write_settings(directory, **settings) -> str:
    with open(directory / "preprocessor_config.json", "w") as handle:
        json.dump(settings, handle)
    return str(directory)


def test_settings_come_from_the_preprocessor_config(tmp_path):
    """Invariant: in_token_limit, mean and std are the checkpoint's (published defaults where absent);
    data.max_pixels lowers the patch limit to max_pixels / 14^2 but never raises it."""
    configured = _write_settings(tmp_path, pad_input=True, in_token_limit=100, image_mean=MEAN, image_std=STD)
    processor = KimiVLImageProcessor.from_pretrained(configured, DataConfig())
    assert (processor.patch_limit, processor.image_mean, processor.image_std) == (100, MEAN, STD)
    assert KimiVLImageProcessor.from_pretrained(configured, DataConfig(max_pixels=56 * 56)).patch_limit == 16
    defaults = KimiVLImageProcessor.from_pretrained(_write_settings(tmp_path, pad_input=True),
                                                    DataConfig(max_pixels=10 ** 7))
    assert (defaults.patch_limit, defaults.patch_size, defaults.merge_kernel_size) == (4096, 14, (2, 2))
    assert defaults.image_mean == CLIP_MEAN


def test_unsupported_settings_raise_naming_the_file(tmp_path):
    """Invariant: a missing preprocessor_config.json, or one asking for the crop mode (pad_input false),
    is a ModelError naming the file (the data path reports it as a DataError)."""
    with pytest.raises(ModelError, match="preprocessor_config.json not found"):
        KimiVLImageProcessor.from_pretrained(str(tmp_path), DataConfig())
    with pytest.raises(ModelError, match="preprocessor_config.json: pad_input"):
        KimiVLImageProcessor.from_pretrained(_write_settings(tmp_path, pad_input=False), DataConfig())

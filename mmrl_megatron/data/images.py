"""Image decoding (with a counted skip reason instead of a crash) and the optional training augmentation."""
import io
import random
from typing import List

from PIL import Image

from mmrl_megatron.config.schema import DataConfig
from mmrl_megatron.data.errors import SkippedRow


# An image is resized to at most data.max_pixels anyway; a header promising far more is refused before
# decoding (a 12000 x 12000 PNG is ~140 KB on disk and ~430 MB decoded). Images up to 16 MP always decode,
# so a small max_pixels does not refuse ordinary photos.
PIXELS_PER_MAX_PIXEL = 64
ALWAYS_DECODED_PIXELS = 4096 * 4096


def pixel_limit(max_pixels: int) -> int:
    """The most pixels an image may have to be decoded at all, derived from data.max_pixels."""
    return max(PIXELS_PER_MAX_PIXEL * max_pixels, ALWAYS_DECODED_PIXELS)


def decode_images(encoded: List[bytes], max_pixels: int = DataConfig.max_pixels, label: str = "image",
                  setting: str = "data.max_pixels") -> List[Image.Image]:
    """RGB images, fully decoded now so that truncated files fail here rather than inside the processor; an image
    whose header gives more than pixel_limit(max_pixels) pixels is skipped without being decoded. Errors name
    the image as f"{label} {number}" and max_pixels as `setting`."""
    images = []
    limit = pixel_limit(max_pixels)
    for number, data in enumerate(encoded):
        try:
            with Image.open(io.BytesIO(data)) as image:  # reads the header only
                width, height = image.size
                if width * height > limit:
                    raise SkippedRow("oversized_image", f"{label} {number} is {width}x{height} pixels, over the "
                                     f"{limit} allowed for {setting}={max_pixels} "
                                     f"(max({PIXELS_PER_MAX_PIXEL} x max_pixels, {ALWAYS_DECODED_PIXELS})); "
                                     "downscale it in the data")
                images.append(image.convert("RGB"))
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
            raise SkippedRow("undecodable_image", f"{label} {number} cannot be decoded: {error}") from error
    return images


def encode_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def augment_image(image: Image.Image, rng: random.Random, rotation_degrees: float, crop_fraction: float) -> Image.Image:
    """A random rotation in [-rotation_degrees, rotation_degrees] (canvas kept, corners filled white) and a random
    crop keeping at least (1 - crop_fraction) of each side; zero disables either."""
    if rotation_degrees > 0:
        image = image.rotate(rng.uniform(-rotation_degrees, rotation_degrees), resample=Image.BILINEAR,
                             fillcolor=(255, 255, 255))
    if crop_fraction > 0:
        width, height = image.size
        keep_width = max(1, round(width * (1 - rng.uniform(0, crop_fraction))))
        keep_height = max(1, round(height * (1 - rng.uniform(0, crop_fraction))))
        left, top = rng.randint(0, width - keep_width), rng.randint(0, height - keep_height)
        image = image.crop((left, top, left + keep_width, top + keep_height))
    return image

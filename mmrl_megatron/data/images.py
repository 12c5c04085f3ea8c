"""Image decoding (with a counted skip reason instead of a crash) and the optional training augmentation."""
import io
import random
from typing import List

from PIL import Image

from mmrl_megatron.data.errors import SkippedRow


def decode_images(encoded: List[bytes]) -> List[Image.Image]:
    """RGB images, fully decoded now so that truncated files fail here rather than inside the processor."""
    images = []
    for number, data in enumerate(encoded):
        try:
            with Image.open(io.BytesIO(data)) as image:
                images.append(image.convert("RGB"))
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
            raise SkippedRow("undecodable_image", f"image {number} cannot be decoded: {error}") from error
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

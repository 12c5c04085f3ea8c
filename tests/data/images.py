"""Small PNG images for data tests."""
import io

from PIL import Image


def png(width: int, height: int, color=(200, 40, 40)) -> bytes:
    buffer = io.BytesIO()
    image = Image.new("RGB", (width, height), (255, 255, 255))
    image.paste(Image.new("RGB", (width // 2, height // 2), color), (width // 4, height // 4))
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def huge_png(side: int = 12000) -> bytes:
    """A side x side PNG that is small on disk (1-bit, blank): a decompression bomb for an RGB decode."""
    buffer = io.BytesIO()
    Image.new("1", (side, side)).save(buffer, format="PNG")
    return buffer.getvalue()

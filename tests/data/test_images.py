"""Image decoding (data/images.py): a header promising more pixels than data.max_pixels allows is refused
before any pixel is decoded."""
import pytest
from PIL import ImageFile

from mmrl_megatron.data.errors import SkippedRow
from mmrl_megatron.data.images import ALWAYS_DECODED_PIXELS, PIXELS_PER_MAX_PIXEL, decode_images, pixel_limit
from tests.data.images import huge_png, png


@pytest.fixture(scope="module")
def bomb() -> bytes:
    data = huge_png()
    assert len(data) < 1 << 20  # under 1 MB on disk, 432 MB as RGB
    return data


def test_limit_follows_max_pixels():
    """Invariant: the limit is PIXELS_PER_MAX_PIXEL x data.max_pixels, never below ALWAYS_DECODED_PIXELS."""
    assert pixel_limit(401408) == PIXELS_PER_MAX_PIXEL * 401408
    assert pixel_limit(3136) == ALWAYS_DECODED_PIXELS


def test_oversized_header_is_refused_without_decoding(bomb, monkeypatch):
    """Invariant: a 12000 x 12000 PNG is skipped as oversized_image, naming its size and the limit, and no
    pixel data is decoded (ImageFile.load is never called)."""
    def no_decoding(self):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    with pytest.raises(SkippedRow) as raised:
        decode_images([bomb], max_pixels=401408)
    assert raised.value.reason == "oversized_image"
    assert str(raised.value).startswith(f"image 0 is 12000x12000 pixels, over the {pixel_limit(401408)} allowed "
                                        "for data.max_pixels=401408")


def test_a_larger_max_pixels_lets_the_same_image_decode():
    """Invariant: the limit is derived from data.max_pixels, so an image refused under a small one decodes
    under a large one (5000 x 5000 = 25 M pixels against 16.8 M and 64 x 401408); small images always decode."""
    data = huge_png(5000)
    with pytest.raises(SkippedRow):
        decode_images([png(56, 56), data], max_pixels=3136)
    assert [image.size for image in decode_images([png(56, 56), data], max_pixels=401408)] == [(56, 56), (5000, 5000)]

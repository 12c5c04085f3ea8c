"""A zoom/crop tool over the sample's image, for Geometry3K-format data (one figure per problem).

The model asks for a region with <zoom>x1,y1,x2,y2</zoom> (top-left and bottom-right corners; all four in
[0, 1]: fractions of the width and height, otherwise pixels of the prompt's first image as stored in the
data) and stops; the tool answers with the crop and a line saying which pixels it shows. A turn with a
\\boxed{} answer, or without a zoom request, ends the conversation. A request that cannot be served (not four
numbers, corners in the wrong order, outside the image) gets a text reply saying what was wrong, so the model
can try again; it never stops the run. tools/data/preprocess_geo3k.py --zoom-tool adds INSTRUCTION to each
prompt.
"""
import io
import math
import re
from typing import Tuple

from PIL import Image

from .base import Environment, EnvironmentReply

INSTRUCTION = ("To look closer at part of the figure, write <zoom>x1,y1,x2,y2</zoom> with the corners of the region "
               "(fractions of the width and height from the top left, or pixels) and stop: the region will be shown "
               "to you.")
ZOOM_REQUEST = re.compile(r"<zoom>(.*?)</zoom>", re.DOTALL)
BOXED_ANSWER = re.compile(r"\\boxed\s*\{")
# a crop is grown around its centre to at least this many pixels a side (within the image): Qwen2.5-VL's
# 14-pixel patches merged 2x2, so even a one-pixel request shows the model a whole image token
MIN_SIDE = 28
Region = Tuple[int, int, int, int]  # left, top, right, bottom, in pixels (right and bottom exclusive)


class InvalidRegion(ValueError):
    """A zoom request that names no usable region; the message is shown to the model."""


def _grown(low: float, high: float, size: int) -> Tuple[int, int]:
    """[low, high) widened to whole pixels and, around its centre, to MIN_SIDE (at most the whole side)."""
    low, high = math.floor(low), math.ceil(high)
    missing = min(MIN_SIDE, size) - (high - low)
    if missing > 0:
        low -= missing // 2
        high += missing - missing // 2
        shift = max(0, -low) - max(0, high - size)
        low, high = low + shift, high + shift
    return low, high


def parse_region(request: str, width: int, height: int) -> Region:
    """The pixel box of a request "x1,y1,x2,y2" (commas or spaces, optional brackets) on a width x height image."""
    numbers = [piece for piece in re.split(r"[\s,]+", request.strip().strip("[]()")) if piece]
    try:
        x1, y1, x2, y2 = (float(piece) for piece in numbers)
    except ValueError:
        raise InvalidRegion(f"expected four numbers x1,y1,x2,y2, got {request.strip()[:40]!r}") from None
    if not all(math.isfinite(value) and value >= 0 for value in (x1, y1, x2, y2)):
        raise InvalidRegion("coordinates must be finite and not negative")
    if max(x1, y1, x2, y2) <= 1:  # fractions of the image
        x1, x2, y1, y2 = x1 * width, x2 * width, y1 * height, y2 * height
    if x1 >= x2 or y1 >= y2:
        raise InvalidRegion("the first corner must be above and left of the second (x1 < x2, y1 < y2)")
    if x1 >= width or y1 >= height:
        raise InvalidRegion(f"the region starts outside the {width}x{height} image")
    left, right = _grown(x1, min(x2, width), width)
    top, bottom = _grown(y1, min(y2, height), height)
    return left, top, right, bottom


class ZoomEnvironment(Environment):
    def step(self, conversation) -> EnvironmentReply:
        text = conversation.last_assistant_text
        requests = ZOOM_REQUEST.findall(text)
        if BOXED_ANSWER.search(text) or not requests:
            return EnvironmentReply(done=True)
        if not self.task.images:
            return EnvironmentReply(text="This problem has no image to zoom into; answer in \\boxed{}.")
        with Image.open(io.BytesIO(self.task.images[0])) as opened:
            image = opened.convert("RGB")
        try:
            region = parse_region(requests[-1], *image.size)
        except InvalidRegion as error:
            return EnvironmentReply(text=f"Cannot zoom: {error}. Write <zoom>x1,y1,x2,y2</zoom>.")
        left, top, right, bottom = region
        return EnvironmentReply(text=f"Pixels x {left}-{right}, y {top}-{bottom} of the {image.width}x{image.height} "
                                     "figure:", images=[image.crop(region)])

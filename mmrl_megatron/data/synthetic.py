"""A synthetic visual counting task in verl's parquet format: "How many red squares?" answered \\boxed{N}.

Each image (default 56x56: a 4x4 grid of the tiny checkpoint's 14-pixel patches) holds 1 to 3 red
squares and at most one blue distractor in separate cells; the same seed gives the same rows. Small
enough that the tiny demo model can learn it; tools/data/make_synthetic.py writes it to files.
"""
import io
import random
from typing import Dict, List, Tuple

from PIL import Image, ImageDraw

from .format import make_row

DATA_SOURCE = "synthetic/count_red_squares"
QUESTION = "How many red squares are in the image? Give the final answer in \\boxed{}."
RED, BLUE = (220, 30, 30), (30, 60, 220)
CELLS_PER_SIDE = 2  # a 56x56 image has 2x2 cells of 28x28 pixels: one Qwen2.5-VL merged image token each


def draw_example(rng: random.Random, image_size: int) -> Tuple[bytes, int]:
    """PNG bytes of one image and its number of red squares (1 to 3, plus at most one blue distractor).

    Each square (the cell less a 1-3 pixel margin, placed with jitter) sits inside its own cell, so squares
    never overlap or touch and each merged image token sees at most one: the demo model learns the count in
    about 250 supervised steps. Squares straddling tokens (a 3x3 grid) or of random sizes were not learned
    in 500-600 steps."""
    red_count = rng.randint(1, 3)
    blue_count = rng.randint(0, min(1, CELLS_PER_SIDE ** 2 - red_count))
    cell = image_size // CELLS_PER_SIDE
    cells = rng.sample(range(CELLS_PER_SIDE ** 2), red_count + blue_count)
    image = Image.new("RGB", (image_size, image_size), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    for number, cell_index in enumerate(cells):
        side = cell - 4
        left = (cell_index % CELLS_PER_SIDE) * cell + rng.randint(1, 3)
        top = (cell_index // CELLS_PER_SIDE) * cell + rng.randint(1, 3)
        draw.rectangle((left, top, left + side - 1, top + side - 1), fill=RED if number < red_count else BLUE)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue(), red_count


def make_rows(count: int, seed: int, split: str, image_size: int = 56) -> List[Dict]:
    rng = random.Random(f"{seed}-{split}")
    rows = []
    for index in range(count):
        image, answer = draw_example(rng, image_size)
        rows.append(make_row(QUESTION, [image], str(answer), DATA_SOURCE, ability="counting",
                             extra_info={"split": split, "index": index, "answer": str(answer)}))
    return rows

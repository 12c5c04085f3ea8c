"""A synthetic visual counting task in verl's parquet format: "How many red squares?" answered \\boxed{N}.

Each image (default 56x56, a few patches for the tiny checkpoint's 14-pixel patches) holds 1 to 3 red
squares and up to 2 blue distractor squares at non-overlapping places; the same seed gives the same rows.
Small enough that the tiny demo model can learn it; tools/data/make_synthetic.py writes it to files.
"""
import io
import random
from typing import Dict, List, Tuple

from PIL import Image, ImageDraw

from .format import make_row

DATA_SOURCE = "synthetic/count_red_squares"
QUESTION = ("How many red squares are in the image? Think step by step inside <think> </think>, "
            "then give the final answer in \\boxed{}.")
RED, BLUE = (220, 30, 30), (30, 60, 220)


def draw_example(rng: random.Random, image_size: int) -> Tuple[bytes, int]:
    """PNG bytes of one image and its number of red squares."""
    red_count, blue_count = rng.randint(1, 3), rng.randint(0, 2)
    cells_per_side = 3  # squares sit in distinct cells of a 3x3 grid, so they never overlap or touch
    cell = image_size // cells_per_side
    cells = rng.sample(range(cells_per_side ** 2), red_count + blue_count)
    image = Image.new("RGB", (image_size, image_size), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    for number, cell_index in enumerate(cells):
        side = rng.randint(cell // 2, cell - 2)
        # a margin of at least one pixel inside the cell keeps squares in neighbouring cells from touching
        left = (cell_index % cells_per_side) * cell + rng.randint(1, cell - side - 1)
        top = (cell_index // cells_per_side) * cell + rng.randint(1, cell - side - 1)
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

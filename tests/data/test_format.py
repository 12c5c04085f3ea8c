"""images[].path in a row (data/format.py): only a regular file of bounded size is read; anything else is a
skipped row with its reason, never a hang or an endless read."""
import os

import pytest

from mmrl_megatron.data.errors import SkippedRow
from mmrl_megatron.data.format import MAX_IMAGE_FILE_BYTES, make_row, parse_row
from tests.data.images import png


def _row_with_image_path(path) -> dict:
    return {**make_row("How many?", [png(56, 56)], "1", "unit"), "images": [{"bytes": None, "path": str(path)}]}


def _refusal(path) -> str:
    with pytest.raises(SkippedRow) as raised:
        parse_row(_row_with_image_path(path))
    assert raised.value.reason == "bad_image_file"
    return str(raised.value)


@pytest.mark.timeout(60)
def test_named_pipe_is_refused_without_blocking(tmp_path):
    """Invariant: a named pipe with no writer is refused at once (opening it for a plain read would block
    the data loader forever)."""
    fifo = tmp_path / "image.png"
    os.mkfifo(fifo)
    assert _refusal(fifo) == (f"image file {fifo} is not a regular file (a named pipe); "
                              "images[].path must name an image file")


@pytest.mark.timeout(60)
def test_device_and_directory_are_refused(tmp_path):
    """Invariant: /dev/zero (endless) and a directory are refused by kind, before anything is read."""
    assert "/dev/zero is not a regular file (a character device)" in _refusal("/dev/zero")
    assert f"{tmp_path} is not a regular file (a directory)" in _refusal(tmp_path)


def test_file_over_the_size_bound_is_refused(tmp_path):
    """Invariant: a regular file larger than MAX_IMAGE_FILE_BYTES is refused (read no further than the bound);
    one of exactly the bound is read."""
    big = tmp_path / "big.png"
    with open(big, "wb") as handle:
        handle.truncate(MAX_IMAGE_FILE_BYTES + 1)  # sparse: costs no disk
    assert f"image file {big} is larger than {MAX_IMAGE_FILE_BYTES >> 20} MiB" in _refusal(big)
    with open(big, "r+b") as handle:
        handle.truncate(MAX_IMAGE_FILE_BYTES)
    assert len(parse_row(_row_with_image_path(big)).images[0]) == MAX_IMAGE_FILE_BYTES


def test_regular_file_through_a_symlink_is_read(tmp_path):
    """Invariant: the check is on the file opened, so a symlink to an image file still reads its bytes."""
    image = tmp_path / "figure.png"
    image.write_bytes(png(56, 56))
    link = tmp_path / "link.png"
    link.symlink_to(image)
    assert parse_row(_row_with_image_path(link)).images == [png(56, 56)]

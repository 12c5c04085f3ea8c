"""The bytes a row's media entries hold (an image, a video frame or clip): inline, or in a local file that is
opened only when it is a regular file.

Files are opened without blocking and checked on the open descriptor, so a named pipe cannot hang the reader, a device
(/dev/zero) cannot be read without end, and the file cannot be swapped between the check and the read.
"""
import os
import stat
from typing import Any, BinaryIO

from mmrl_megatron.data.errors import SkippedRow

MAX_IMAGE_FILE_BYTES = 64 << 20  # an encoded image file above this is refused rather than read into memory


def _file_kind(mode: int) -> str:
    kinds = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a named pipe"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def local_path(reference: str) -> str:
    """A path or file:// URL as a path."""
    return reference[len("file://"):] if reference.startswith("file://") else reference


def open_regular_file(reference: str, kind: str, hint: str) -> BinaryIO:
    """A binary handle on the regular file `reference` (a path or file:// URL); SkippedRow otherwise, with the
    reasons undecodable_<kind> (cannot be opened) and bad_<kind>_file (not a regular file) and `hint` appended."""
    path = local_path(reference)
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as error:
        raise SkippedRow(f"undecodable_{kind}", f"{kind} file {path} cannot be read: {error}") from error
    mode = os.fstat(descriptor).st_mode
    if not stat.S_ISREG(mode):
        os.close(descriptor)
        raise SkippedRow(f"bad_{kind}_file", f"{kind} file {path} is not a regular file ({_file_kind(mode)}); {hint}")
    return os.fdopen(descriptor, "rb")


def read_image_file(reference: str, hint: str = "images[].path must name an image file") -> bytes:
    """The bytes of a regular image file of at most MAX_IMAGE_FILE_BYTES (read no further than the bound)."""
    with open_regular_file(reference, "image", hint) as handle:
        data = handle.read(MAX_IMAGE_FILE_BYTES + 1)
    if len(data) > MAX_IMAGE_FILE_BYTES:
        raise SkippedRow("bad_image_file", f"image file {local_path(reference)} is larger than {MAX_IMAGE_FILE_BYTES >> 20} MiB; {hint}")
    return data


def encoded_image(image: Any, what: str, hint: str) -> bytes:
    """An encoded image from raw bytes, a {"bytes": ...} struct, or a struct naming a local file in "path" /
    "image" (when "bytes" is empty); `what` names it in the error ("image 2", "video 0 frame 3")."""
    data = image.get("bytes") if isinstance(image, dict) else image
    if isinstance(image, dict) and not data:
        reference = image.get("path") or image.get("image")
        data = read_image_file(reference, hint) if isinstance(reference, str) and reference else None
    if not isinstance(data, (bytes, bytearray)) or not data:
        raise SkippedRow("wrong_type", f"{what} has no bytes (got {type(data).__name__})")
    return bytes(data)

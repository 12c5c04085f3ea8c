"""The verl parquet row format: parse one row into messages, image bytes and reward fields, or say why not.

Columns: `prompt` (a chat list of {role, content}; content is a string with "<image>" placeholders, as
verl writes it, or a list of {"type": "image"} / {"type": "text", "text": ...} parts), `images` (a list
of {"bytes": ...} structs, raw bytes, or {"path": local file} structs; optional for text-only data; a path must
name a regular file of at most MAX_IMAGE_FILE_BYTES), `reward_model` ({style, ground_truth}), `data_source`,
`ability`, `extra_info` (optional).
"""
import os
import re
import stat
from dataclasses import dataclass
from typing import Any, Dict, List

from mmrl_megatron.data.errors import SkippedRow

REQUIRED_COLUMNS = ("prompt", "reward_model")
IMAGE_PLACEHOLDER = "<image>"
_PLACEHOLDER_SPLIT = re.compile(f"({re.escape(IMAGE_PLACEHOLDER)})")
MAX_IMAGE_FILE_BYTES = 64 << 20  # an encoded image file above this is refused rather than read into memory


@dataclass
class ParsedRow:
    messages: List[Dict[str, Any]]
    images: List[bytes]
    ground_truth: Any
    data_source: str
    ability: str
    extra_info: Dict[str, Any]


def _content_parts(content: Any) -> List[Dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "image"} if piece == IMAGE_PLACEHOLDER else {"type": "text", "text": piece}
                for piece in _PLACEHOLDER_SPLIT.split(content) if piece]
    if not isinstance(content, list):
        raise SkippedRow("wrong_type", f"message content is {type(content).__name__}, expected a string or a list of parts")
    parts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "image":
            parts.append({"type": "image"})
        elif kind == "text" and isinstance(part.get("text"), str):
            parts.extend(_content_parts(part["text"]))
        else:
            raise SkippedRow("wrong_type", f"content part {part!r} is neither an image nor a text part")
    return parts


def parse_messages(prompt: Any) -> List[Dict[str, Any]]:
    """The chat as role/content-part messages; a bare string is one user turn."""
    if prompt is None:
        raise SkippedRow("missing_field", "prompt is null")
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    if not isinstance(prompt, list):
        raise SkippedRow("wrong_type", f"prompt is {type(prompt).__name__}, expected a chat list")
    messages = []
    for message in prompt:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise SkippedRow("wrong_type", f"prompt message {message!r} has no string role")
        if message.get("content") is None:
            raise SkippedRow("missing_field", f"{message['role']} message has no content")
        messages.append({"role": message["role"], "content": _content_parts(message["content"])})
    if not any(part["type"] == "image" or part["text"].strip() for message in messages for part in message["content"]):
        raise SkippedRow("empty_prompt", "prompt has no text and no image")
    return messages


def _read_image_file(reference: str) -> bytes:
    """The bytes of a regular file of at most MAX_IMAGE_FILE_BYTES. Opened without blocking and checked on the
    open descriptor, so a named pipe cannot hang the reader, a device (/dev/zero) cannot be read without end,
    and the file cannot be swapped between the check and the read."""
    path = reference[len("file://"):] if reference.startswith("file://") else reference
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as error:
        raise SkippedRow("undecodable_image", f"image file {path} cannot be read: {error}") from error
    mode = os.fstat(descriptor).st_mode
    if not stat.S_ISREG(mode):
        os.close(descriptor)
        raise SkippedRow("bad_image_file", f"image file {path} is not a regular file ({_file_kind(mode)}); "
                         "images[].path must name an image file")
    with os.fdopen(descriptor, "rb") as handle:
        data = handle.read(MAX_IMAGE_FILE_BYTES + 1)
    if len(data) > MAX_IMAGE_FILE_BYTES:
        raise SkippedRow("bad_image_file", f"image file {path} is larger than {MAX_IMAGE_FILE_BYTES >> 20} MiB; "
                         "images[].path must name an image file")
    return data


def _file_kind(mode: int) -> str:
    kinds = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a named pipe"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def parse_images(images: Any) -> List[bytes]:
    """Encoded image bytes from a list of bytes, {"bytes": ...} structs, or structs naming a local file in
    "path" / "image" (when "bytes" is empty)."""
    if images is None:
        return []
    if not isinstance(images, list):
        raise SkippedRow("wrong_type", f"images is {type(images).__name__}, expected a list")
    encoded = []
    for image in images:
        data = image.get("bytes") if isinstance(image, dict) else image
        if isinstance(image, dict) and not data:
            reference = image.get("path") or image.get("image")
            data = _read_image_file(reference) if isinstance(reference, str) and reference else None
        if not isinstance(data, (bytes, bytearray)) or not data:
            raise SkippedRow("wrong_type", f"image {len(encoded)} has no bytes (got {type(data).__name__})")
        encoded.append(bytes(data))
    return encoded


def _place_images(messages: List[Dict[str, Any]], image_count: int) -> None:
    """Match image parts to images; rows written without placeholders get the images before the first user text."""
    placeholders = sum(part["type"] == "image" for message in messages for part in message["content"])
    if placeholders == image_count:
        return
    if placeholders == 0:
        first_user = next((m for m in messages if m["role"] == "user"), None)
        if first_user is not None:
            first_user["content"][:0] = [{"type": "image"}] * image_count
            return
    raise SkippedRow("image_count_mismatch", f"{placeholders} image placeholders but {image_count} images")


def parse_row(row: Dict[str, Any]) -> ParsedRow:
    """Validate one row (a dict of column values); raises SkippedRow with the counter reason."""
    messages = parse_messages(row.get("prompt"))
    images = parse_images(row.get("images"))
    _place_images(messages, len(images))
    reward_model = row.get("reward_model")
    if not isinstance(reward_model, dict) or reward_model.get("ground_truth") is None:
        raise SkippedRow("missing_field", "reward_model.ground_truth is missing")
    ground_truth = reward_model["ground_truth"]
    if isinstance(ground_truth, (int, float)):
        ground_truth = str(ground_truth)
    extra_info = row.get("extra_info")
    if extra_info is not None and not isinstance(extra_info, dict):
        raise SkippedRow("wrong_type", f"extra_info is {type(extra_info).__name__}, expected a dict")
    return ParsedRow(messages=messages, images=images, ground_truth=ground_truth,
                     data_source=str(row.get("data_source") or "unknown"), ability=str(row.get("ability") or ""),
                     extra_info=dict(extra_info or {}))


def make_row(question: str, images: List[bytes], ground_truth: str, data_source: str, ability: str = "math",
             extra_info: Dict[str, Any] = None) -> Dict[str, Any]:
    """A row in verl's layout: one user turn with an "<image>" placeholder per image before the question."""
    return {"data_source": data_source,
            "prompt": [{"role": "user", "content": IMAGE_PLACEHOLDER * len(images) + question}],
            "images": [{"bytes": data} for data in images], "ability": ability,
            "reward_model": {"style": "rule", "ground_truth": ground_truth},
            "extra_info": dict(extra_info) if extra_info else None}  # parquet cannot store an empty struct


def write_rows(path: str, rows: List[Dict[str, Any]], row_group_size: int = 256) -> None:
    """Write rows (dicts in the layout above) to one parquet file with the given row-group size."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=row_group_size)

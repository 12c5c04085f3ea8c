"""The verl parquet row format: parse one row into messages, image bytes, videos and reward fields, or say why not.

Columns: `prompt` (a chat list of {role, content}; content is a string with "<image>" / "<video>" placeholders,
as verl writes it, or a list of {"type": "image"} / {"type": "video"} / {"type": "text", "text": ...} parts),
`images` (a list of {"bytes": ...} structs, raw bytes, or {"path": local file} structs; optional for text-only
data; a path must name a regular file of at most MAX_IMAGE_FILE_BYTES), `videos` (optional; one entry per
"<video>", in the forms data/videos.py lists), `reward_model` ({style, ground_truth}), `data_source`,
`ability`, `extra_info` (optional).
"""
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from mmrl_megatron.data.errors import SkippedRow
from mmrl_megatron.data.files import MAX_IMAGE_FILE_BYTES, encoded_image  # noqa: F401 (the bound, named here)
from mmrl_megatron.data.videos import VideoEntry, parse_videos

REQUIRED_COLUMNS = ("prompt", "reward_model")
IMAGE_PLACEHOLDER = "<image>"
VIDEO_PLACEHOLDER = "<video>"
_PLACEHOLDERS = {IMAGE_PLACEHOLDER: "image", VIDEO_PLACEHOLDER: "video"}
_PLACEHOLDER_SPLIT = re.compile(f"({re.escape(IMAGE_PLACEHOLDER)}|{re.escape(VIDEO_PLACEHOLDER)})")


@dataclass
class ParsedRow:
    messages: List[Dict[str, Any]]
    images: List[bytes]
    ground_truth: Any
    data_source: str
    ability: str
    extra_info: Dict[str, Any]
    videos: List[VideoEntry] = field(default_factory=list)


def _content_parts(content: Any) -> List[Dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": _PLACEHOLDERS[piece]} if piece in _PLACEHOLDERS else {"type": "text", "text": piece}
                for piece in _PLACEHOLDER_SPLIT.split(content) if piece]
    if not isinstance(content, list):
        raise SkippedRow("wrong_type", f"message content is {type(content).__name__}, expected a string or a list of parts")
    parts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("image", "video"):
            parts.append({"type": kind})
        elif kind == "text" and isinstance(part.get("text"), str):
            parts.extend(_content_parts(part["text"]))
        else:
            raise SkippedRow("wrong_type", f"content part {part!r} is neither an image, a video nor a text part")
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
    if not any(part["type"] != "text" or part["text"].strip() for message in messages for part in message["content"]):
        raise SkippedRow("empty_prompt", "prompt has no text, no image and no video")
    return messages


def parse_images(images: Any) -> List[bytes]:
    """Encoded image bytes from a list of bytes, {"bytes": ...} structs, or structs naming a local file in
    "path" / "image" (when "bytes" is empty)."""
    if images is None:
        return []
    if not isinstance(images, list):
        raise SkippedRow("wrong_type", f"images is {type(images).__name__}, expected a list")
    return [encoded_image(image, f"image {number}", "images[].path must name an image file")
            for number, image in enumerate(images)]


def _place_media(messages: List[Dict[str, Any]], kind: str, count: int) -> None:
    """Match `kind` ("image"/"video") parts to the row's items; rows written without placeholders of that kind
    get the items before the first user text (videos after images)."""
    placeholders = sum(part["type"] == kind for message in messages for part in message["content"])
    if placeholders == count:
        return
    if placeholders == 0:
        first_user = next((m for m in messages if m["role"] == "user"), None)
        if first_user is not None:
            content = first_user["content"]
            leading_images = next((i for i, part in enumerate(content) if part["type"] != "image"), len(content))
            at = leading_images if kind == "video" else 0
            content[at:at] = [{"type": kind}] * count
            return
    raise SkippedRow(f"{kind}_count_mismatch", f"{placeholders} {kind} placeholders but {count} {kind}s")


def parse_row(row: Dict[str, Any]) -> ParsedRow:
    """Validate one row (a dict of column values); raises SkippedRow with the counter reason."""
    messages = parse_messages(row.get("prompt"))
    images, videos = parse_images(row.get("images")), parse_videos(row.get("videos"))
    _place_media(messages, "image", len(images))
    _place_media(messages, "video", len(videos))
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
                     extra_info=dict(extra_info or {}), videos=videos)


def make_row(question: str, images: List[bytes], ground_truth: str, data_source: str, ability: str = "math",
             extra_info: Dict[str, Any] = None, videos: Optional[List[Any]] = None) -> Dict[str, Any]:
    """A row in verl's layout: one user turn with an "<image>" placeholder per image, then a "<video>" one per
    video entry (given in a data/videos.py form; no `videos` column without them), before the question."""
    placeholders = IMAGE_PLACEHOLDER * len(images) + VIDEO_PLACEHOLDER * len(videos or [])
    row = {"data_source": data_source, "prompt": [{"role": "user", "content": placeholders + question}],
           "images": [{"bytes": data} for data in images], "ability": ability,
           "reward_model": {"style": "rule", "ground_truth": ground_truth},
           "extra_info": dict(extra_info) if extra_info else None}  # parquet cannot store an empty struct
    if videos:
        row["videos"] = list(videos)
    return row


def write_rows(path: str, rows: List[Dict[str, Any]], row_group_size: int = 256) -> None:
    """Write rows (dicts in the layout above) to one parquet file with the given row-group size."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=row_group_size)

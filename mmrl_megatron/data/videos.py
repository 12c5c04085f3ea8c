"""A row's `videos` column in verl's forms, and the frames each video gives within the frame and pixel budget.

Each entry stands for one "<video>" placeholder, in order, in the forms verl hands to qwen-vl-utils:
- a list of frames: encoded images as bytes, {"bytes": ...} or {"path": ...} structs, or file paths;
- an encoded clip: bytes, a path (or file:// URL), or a {"bytes": ...} / {"path": ...} struct (what Hugging Face
  datasets' Video feature writes);
- a struct {"video": <either of the above>, ...} whose other keys (VIDEO_SETTINGS) override data.video's for it.

Sampling and sizing are qwen-vl-utils' fetch_video rules, written out here because that package imports
torchvision, which has no build beside the CPU torch:
- an encoded clip gives `nframes` frames, or fps x its duration clamped to [min_frames, max_frames], rounded
  down to a multiple of the temporal patch, at evenly spaced indices; sample_fps = frames / clip frames x clip fps;
- a frame list is taken whole at its `sample_fps` and padded with its last frame to the temporal patch (longer
  than max_frames, it is sampled down evenly with sample_fps scaled: qwen-vl-utils keeps every frame);
- all frames of a video take one size, smart_resize of theirs under min_pixels and
  max(min(max_pixels, total_pixels / frames x temporal patch), 1.05 x min_pixels), resized with PIL's bicubic
  filter (qwen-vl-utils resizes with torchvision's, so resized pixel values differ slightly).
"""
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Union

import torch
from PIL import Image

from mmrl_megatron.data.errors import SkippedRow
from mmrl_megatron.data.files import encoded_image, open_regular_file, read_image_file
from mmrl_megatron.data.images import decode_images, pixel_limit
from mmrl_megatron.data.video_decoding import decode_clip

VIDEO_SETTINGS = ("fps", "nframes", "min_frames", "max_frames", "sample_fps", "min_pixels", "max_pixels",
                  "total_pixels")
# qwen-vl-utils keys this loader does not apply: refused rather than silently ignored
UNSUPPORTED_SETTINGS = ("video_start", "video_end", "resized_height", "resized_width")
MAX_ASPECT_RATIO = 200
FRAME_HINT = "a frame path in videos[] must name an image file"


@dataclass(frozen=True)
class VideoEntry:
    """One video of a row: its frames (encoded images) or its clip (bytes or a local path), and its own settings."""
    frames: Optional[List[bytes]] = None
    clip: Optional[Union[bytes, str]] = None
    settings: Dict[str, float] = field(default_factory=dict)


@dataclass
class DecodedVideo:
    frames: List[Image.Image]  # RGB, one size (multiples of the spatial factor), a multiple of the temporal patch
    sample_fps: float  # frames per second of video time that the frames stand for


def _settings(entry: Dict[str, Any], what: str) -> Dict[str, float]:
    for key in UNSUPPORTED_SETTINGS:
        if entry.get(key) is not None:
            raise SkippedRow("unsupported_video_setting", f"{what} sets {key}, which this loader does not apply; "
                             "cut or resize the video in the data")
    settings = {}
    for key in VIDEO_SETTINGS:
        value = entry.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise SkippedRow("wrong_type", f"{what}: {key}={value!r} must be a positive number")
        settings[key] = value
    if "fps" in settings and "nframes" in settings:
        raise SkippedRow("wrong_type", f"{what} sets both fps and nframes; give one")
    return settings


def _entry(entry: Any, what: str) -> VideoEntry:
    settings = _settings(entry, what) if isinstance(entry, dict) else {}
    if isinstance(entry, dict):
        entry = entry["video"] if entry.get("video") is not None else entry.get("bytes") or entry.get("path")
    if isinstance(entry, (bytes, bytearray)) and entry:
        return VideoEntry(clip=bytes(entry), settings=settings)
    if isinstance(entry, str) and entry:
        return VideoEntry(clip=entry, settings=settings)
    if isinstance(entry, list) and entry:
        frames = [read_image_file(frame, FRAME_HINT) if isinstance(frame, str) else
                  encoded_image(frame, f"{what} frame {number}", FRAME_HINT) for number, frame in enumerate(entry)]
        return VideoEntry(frames=frames, settings=settings)
    raise SkippedRow("wrong_type", f"{what} is {type(entry).__name__}; expected a list of frames, an encoded clip "
                     "(bytes or a path), or a struct holding one of them in 'video'")


def parse_videos(videos: Any) -> List[VideoEntry]:
    """The entries of a `videos` column value (None: no videos); SkippedRow("wrong_type") for other forms."""
    if videos is None:
        return []
    if not isinstance(videos, list):
        raise SkippedRow("wrong_type", f"videos is {type(videos).__name__}, expected a list")
    return [_entry(entry, f"video {number}") for number, entry in enumerate(videos)]


def floor_by(value: float, factor: int) -> int:
    return math.floor(value / factor) * factor


def ceil_by(value: float, factor: int) -> int:
    return math.ceil(value / factor) * factor


def even_indices(total: int, count: int) -> List[int]:
    """`count` evenly spaced frame indices over [0, total - 1] (torch's float32 linspace, as qwen-vl-utils)."""
    return torch.linspace(0, total - 1, count).round().long().tolist()


def clip_frame_count(settings: Dict[str, float], total: int, clip_fps: float, config, temporal: int) -> int:
    """Frames to sample from a clip of `total` frames at clip_fps (qwen-vl-utils' smart_nframes)."""
    if total < temporal:
        raise SkippedRow("unusable_video", f"the clip has {total} frame(s); a video needs at least {temporal}")
    if "nframes" in settings:
        count = round(settings["nframes"] / temporal) * temporal
    else:
        low = ceil_by(settings.get("min_frames", config.min_frames), temporal)
        high = floor_by(settings.get("max_frames", min(config.max_frames, total)), temporal)
        wanted = total / clip_fps * settings.get("fps", config.fps)
        count = floor_by(min(max(wanted, low), high, total), temporal)
    if not temporal <= count <= total:
        raise SkippedRow("unusable_video", f"sampling asks for {count} frames of a clip of {total}; set its "
                         f"nframes or min_frames/max_frames within [{temporal}, {total}]")
    return count


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: float):
    """(height, width) multiples of `factor`, of about the same aspect, with min_pixels <= h * w <= max_pixels
    (qwen-vl-utils' smart_resize; transformers' differs at the edges)."""
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise SkippedRow("unusable_video", f"frames of {width}x{height} exceed the aspect ratio {MAX_ASPECT_RATIO}")
    if max_pixels < min_pixels:
        raise SkippedRow("unusable_video", f"max_pixels {max_pixels} is below min_pixels {min_pixels}")
    resized_height = max(factor, round(height / factor) * factor)
    resized_width = max(factor, round(width / factor) * factor)
    if resized_height * resized_width > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        resized_height, resized_width = floor_by(height / beta, factor), floor_by(width / beta, factor)
    elif resized_height * resized_width < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        resized_height, resized_width = ceil_by(height * beta, factor), ceil_by(width * beta, factor)
    return resized_height, resized_width


def frame_size(height: int, width: int, count: int, settings: Dict[str, float], config, factor: int, temporal: int):
    """The one (height, width) of a video's `count` frames under the per-frame and whole-video pixel budgets."""
    min_pixels = settings.get("min_pixels", config.min_pixels)
    total_pixels = settings.get("total_pixels", config.total_pixels)
    max_pixels = max(min(config.max_pixels, total_pixels / count * temporal), int(min_pixels * 1.05))
    return smart_resize(height, width, factor, min_pixels, min(settings.get("max_pixels", max_pixels), max_pixels))


def _frames_of_list(entry: VideoEntry, config, temporal: int, what: str):
    try:
        frames = decode_images(entry.frames, config.max_pixels, f"{what} frame", "data.video.max_pixels")
    except SkippedRow as skipped:  # counted with the videos, not the images
        raise SkippedRow(skipped.reason.replace("image", "video"), str(skipped)) from skipped
    rate = entry.settings.get("sample_fps", config.fps)
    limit = max(temporal, floor_by(entry.settings.get("max_frames", config.max_frames), temporal))
    if len(frames) > limit:
        rate *= limit / len(frames)
        frames = [frames[index] for index in even_indices(len(frames), limit)]
    return frames + frames[-1:] * (-len(frames) % temporal), rate


def _frames_of_clip(entry: VideoEntry, config, temporal: int, what: str):
    def pick(total: int, clip_fps: float) -> List[int]:
        return even_indices(total, clip_frame_count(entry.settings, total, clip_fps, config, temporal))

    hint = "videos[] must name a video file"
    try:
        if isinstance(entry.clip, str):
            with open_regular_file(entry.clip, "video", hint) as handle:
                frames, total, clip_fps = decode_clip(handle, pick, pixel_limit(config.max_pixels))
        else:
            frames, total, clip_fps = decode_clip(entry.clip, pick, pixel_limit(config.max_pixels))
    except SkippedRow as skipped:
        raise SkippedRow(skipped.reason, f"{what}: {skipped}") from skipped
    return frames, len(frames) / total * clip_fps


def load_video(entry: VideoEntry, config, factor: int, temporal: int, what: str = "video") -> DecodedVideo:
    """The frames of one video, sampled and resized under `config` (data.video) and the entry's settings, for a
    model whose frames are multiples of `factor` pixels and grouped `temporal` at a time; SkippedRow otherwise."""
    frames, rate = (_frames_of_list if entry.frames is not None else _frames_of_clip)(entry, config, temporal, what)
    sizes = {frame.size for frame in frames}
    if len(sizes) > 1:
        raise SkippedRow("unusable_video", f"{what}: its frames differ in size ({sorted(sizes)}); give one size")
    width, height = frames[0].size
    resized_height, resized_width = frame_size(height, width, len(frames), entry.settings, config, factor, temporal)
    if (resized_width, resized_height) != (width, height):
        frames = [frame.resize((resized_width, resized_height), Image.BICUBIC) for frame in frames]
    return DecodedVideo(frames, rate)

"""Decoding the sampled frames of an encoded clip with PyAV (FFmpeg's libraries; the optional `video` extra:
pip install 'mmrl_megatron[video]'). Frames given as a list of images never come here and need no decoder.

A clip is read twice: once demuxing its packets (no decoding) to count the frames, as the sampling rule needs
the total before it picks indices, then decoding in order up to the last index picked, keeping only those
frames; so memory holds the sampled frames, never the whole clip.
"""
import io
from typing import BinaryIO, Callable, List, Tuple, Union

from PIL import Image

from mmrl_megatron.data.errors import SkippedRow

# (frames in the clip, the clip's frames per second) -> indices of the frames to keep, ascending
FramePicker = Callable[[int, float], List[int]]
INSTALL_HINT = "install PyAV (pip install 'mmrl_megatron[video]') or give the video as a list of frames"


def _import_av():
    try:
        import av
    except ImportError as error:
        raise SkippedRow("video_decoder_missing", f"an encoded video needs PyAV, which is not installed: "
                         f"{INSTALL_HINT}") from error
    return av


def _rewind(source: Union[bytes, BinaryIO]):
    """A readable file object positioned at the start of the clip (a fresh one for bytes)."""
    if isinstance(source, (bytes, bytearray)):
        return io.BytesIO(source)
    source.seek(0)
    return source


def _count_and_rate(av, source, pixel_limit: int) -> Tuple[int, float]:
    with av.open(_rewind(source)) as container:
        if not container.streams.video:
            raise SkippedRow("undecodable_video", "the clip has no video stream")
        stream = container.streams.video[0]
        width, height = stream.codec_context.width, stream.codec_context.height
        if width * height > pixel_limit:
            raise SkippedRow("oversized_video", f"the clip's frames are {width}x{height} pixels, over the "
                             f"{pixel_limit} allowed for data.video.max_pixels; downscale it in the data")
        rate = stream.average_rate or stream.guessed_rate
        if not rate:
            raise SkippedRow("undecodable_video", "the clip states no frame rate")
        total = sum(1 for packet in container.demux(stream) if packet.size)
        listed = stream.frames  # the header's count where the container keeps one (MP4), else 0
    if total == 0 or total < listed:
        raise SkippedRow("undecodable_video", f"the clip holds {total} frames but its header lists {listed} "
                         "(truncated or damaged file)")
    return total, float(rate)


def _decode_at(av, source, indices: List[int], total: int) -> List[Image.Image]:
    wanted, kept, last = set(indices), {}, max(indices)
    with av.open(_rewind(source)) as container:
        for number, frame in enumerate(container.decode(container.streams.video[0])):
            if number in wanted:
                kept[number] = frame.to_image().convert("RGB")
            if number == last:
                break
    if last not in kept:
        raise SkippedRow("undecodable_video", f"the clip ends after {len(kept)} of the sampled frames; its "
                         f"container lists {total} frames (truncated or damaged file)")
    return [kept[index] for index in indices]


def decode_clip(source: Union[bytes, BinaryIO], pick: FramePicker, pixel_limit: int) -> Tuple[List[Image.Image], int,
                                                                                                 float]:
    """(the RGB frames `pick` chose, in its order; frames in the clip; its frame rate). SkippedRow with reason
    undecodable_video (damaged, empty, no stream or rate), oversized_video (frames over pixel_limit pixels,
    refused before decoding) or video_decoder_missing (no PyAV)."""
    av = _import_av()
    try:
        total, rate = _count_and_rate(av, source, pixel_limit)
        return _decode_at(av, source, pick(total, rate), total), total, rate
    except av.FFmpegError as error:
        raise SkippedRow("undecodable_video", f"the clip cannot be decoded: {error}") from error

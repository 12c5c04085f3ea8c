"""A row's videos (data/videos.py, data/video_decoding.py): verl's entry forms, qwen-vl-utils' frame-sampling and
sizing rules (the oracle, imported from qwen-vl-utils itself), decoding of encoded clips, and the refusals."""
import numpy as np
import pytest

from mmrl_megatron.config.schema import VideoConfig
from mmrl_megatron.data.errors import SkippedRow
from mmrl_megatron.data.videos import clip_frame_count, load_video, parse_videos, smart_resize
from tests.data.videos import encoded_clip, frame_arrays, png_frames, qwen_vl_utils

FACTOR, TEMPORAL = 28, 2  # Qwen2.5-VL: 14-pixel patches merged 2x2; 2 frames per temporal patch
SMALL = VideoConfig(min_pixels=28 * 28, max_pixels=56 * 84)  # test frames keep their size


def _video(entry, config=SMALL):
    return load_video(parse_videos([entry])[0], config, FACTOR, TEMPORAL, "video 0")


def _pixels(video):
    return [np.asarray(frame) for frame in video.frames]


@pytest.mark.parametrize("settings,total,fps", [
    ({}, 12, 4.0), ({}, 3, 30.0), ({}, 1000, 25.0), ({}, 90, 29.97), ({"fps": 1}, 300, 30.0),
    ({"fps": 8, "max_frames": 20}, 100, 10.0), ({"min_frames": 7}, 50, 25.0), ({"nframes": 5}, 12, 4.0),
    ({"nframes": 7}, 8, 4.0), ({"max_frames": 1000}, 600, 1.0)])
def test_frame_count_is_qwen_vl_utils_smart_nframes(settings, total, fps):
    """Invariant: the frames sampled from a clip are as many as qwen-vl-utils' smart_nframes picks (the rule verl
    uses), under data.video's defaults (its constants) or a row's own fps/nframes/min_frames/max_frames."""
    expected = qwen_vl_utils().smart_nframes(dict(settings), total_frames=total, video_fps=fps)
    assert clip_frame_count(settings, total, fps, VideoConfig(), TEMPORAL) == expected


def test_frame_counts_qwen_vl_utils_refuses_are_refused():
    """Invariant: where smart_nframes raises (too few frames), the row is skipped as unusable_video."""
    for settings, total in (({}, 1), ({"nframes": 11}, 8)):
        with pytest.raises(ValueError):
            qwen_vl_utils().smart_nframes(dict(settings), total_frames=total, video_fps=4.0)
        with pytest.raises(SkippedRow) as raised:
            clip_frame_count(settings, total, 4.0, VideoConfig(), TEMPORAL)
        assert raised.value.reason == "unusable_video"


@pytest.mark.parametrize("height,width", [(56, 84), (30, 400), (1080, 1920), (17, 23), (720, 1280), (5, 900)])
@pytest.mark.parametrize("min_pixels,max_pixels", [(28 * 28, 56 * 84), (100352, 602112), (3136, 20000.5)])
def test_frame_size_is_qwen_vl_utils_smart_resize(height, width, min_pixels, max_pixels):
    """Invariant: frames are resized to qwen-vl-utils' smart_resize of their size (a fractional max_pixels, as
    total_pixels / frames gives, included)."""
    expected = qwen_vl_utils().smart_resize(height, width, FACTOR, min_pixels=min_pixels, max_pixels=max_pixels)
    assert smart_resize(height, width, FACTOR, min_pixels, max_pixels) == expected


def test_whole_video_budget_shrinks_frames_as_frames_grow():
    """Invariant: data.video.total_pixels is shared by a video's frames: more frames, fewer pixels each, never
    above total_pixels / frames x temporal patch (unless held at 1.05 x min_pixels)."""
    config = VideoConfig(min_pixels=28 * 28, max_pixels=224 * 224, total_pixels=2 * 224 * 224)
    areas = []
    for count in (4, 8, 16):
        frames = png_frames(frame_arrays(count, 224, 224))
        video = _video({"video": frames}, config)
        width, height = video.frames[0].size
        assert width * height <= max(config.total_pixels / count * TEMPORAL, 1.05 * config.min_pixels)
        areas.append(width * height)
    assert areas[0] > areas[1] > areas[2]


def test_frame_list_forms_give_the_same_video(tmp_path):
    """Invariant: a frame list given as bytes, {"bytes"} structs, paths, file:// URLs or {"path"} structs, bare or
    inside {"video": ...}, gives the same frames at the same sample_fps; padded to the temporal patch."""
    arrays = frame_arrays(5, 56, 84)
    encoded = png_frames(arrays)
    paths = []
    for number, data in enumerate(encoded):
        paths.append(tmp_path / f"frame{number}.png")
        paths[-1].write_bytes(data)
    forms = [encoded, [{"bytes": data} for data in encoded], [str(path) for path in paths],
             [f"file://{path}" for path in paths], [{"bytes": None, "path": str(path)} for path in paths],
             {"video": encoded}, {"video": encoded, "sample_fps": None}]
    for form in forms:
        video = _video(form)
        assert [frame.tobytes() for frame in _pixels(video)] == [a.tobytes() for a in arrays + arrays[-1:]], form
        assert video.sample_fps == SMALL.fps
    assert _video({"video": encoded, "sample_fps": 3}).sample_fps == 3


def test_frame_list_beyond_max_frames_is_sampled_down_evenly():
    """Invariant: a frame list longer than max_frames keeps max_frames evenly spaced frames (first and last
    included) and its frame rate shrinks by the same factor."""
    arrays = frame_arrays(10, 28, 28)
    video = _video({"video": png_frames(arrays), "max_frames": 4, "sample_fps": 5})
    kept = [int(i) for i in np.round(np.linspace(0, 9, 4))]
    assert [f.tobytes() for f in _pixels(video)] == [arrays[i].tobytes() for i in kept]
    assert video.sample_fps == pytest.approx(5 * 4 / 10)


@pytest.mark.parametrize("settings", [{}, {"nframes": 4}, {"fps": 1, "min_frames": 2}])
def test_encoded_clip_gives_its_sampled_frames(settings):
    """Invariant: an encoded clip (lossless, so frames compare exactly) yields the frames at evenly spaced indices
    (first and last included) of the count the rule picks, with sample_fps = frames / clip frames x clip fps."""
    arrays, fps = frame_arrays(12, 56, 84), 4
    video = _video({"video": encoded_clip(arrays, fps), **settings})
    count = clip_frame_count(settings, len(arrays), fps, SMALL, TEMPORAL)
    picked = [int(i) for i in np.round(np.linspace(0, len(arrays) - 1, count))]
    assert [f.tobytes() for f in _pixels(video)] == [arrays[i].tobytes() for i in picked]
    assert video.sample_fps == pytest.approx(count / len(arrays) * fps)


def test_encoded_clip_forms_give_the_same_video(tmp_path):
    """Invariant: a clip as bytes, a path, a file:// URL, a {"bytes"} or {"path"} struct, or inside {"video"}
    decodes to the same frames; an MP4 (H.264, lossy) of the same frames gives as many, of the same size."""
    arrays = frame_arrays(8, 56, 84)
    clip = encoded_clip(arrays, 4)
    path = tmp_path / "clip.mkv"
    path.write_bytes(clip)
    forms = [clip, str(path), f"file://{path}", {"bytes": clip}, {"bytes": None, "path": str(path)},
             {"video": str(path)}]
    decoded = [[f.tobytes() for f in _pixels(_video(form))] for form in forms]
    assert all(frames == decoded[0] for frames in decoded)
    lossy = _video(encoded_clip(arrays, 4, codec="libx264", container="mp4"))
    assert len(lossy.frames) == len(decoded[0]) and lossy.frames[0].size == (84, 56)


def _refusal(entry, config=SMALL) -> SkippedRow:
    with pytest.raises(SkippedRow) as raised:
        _video(entry, config)
    return raised.value


def test_corrupt_clips_are_skipped_naming_the_video(tmp_path):
    """Invariant: truncated clips (Matroska cut in its header, MP4 cut in half), bytes that are no video, a clip
    of one frame, a missing file and a directory are skipped rows with a counted reason and a message naming
    the video; nothing raises past the row."""
    clip, mp4 = encoded_clip(frame_arrays(8, 56, 84), 4), encoded_clip(frame_arrays(8, 56, 84), 4, "libx264", "mp4")
    for entry in (clip[:200], mp4[:len(mp4) // 2], b"not a video at all" * 50, str(tmp_path / "missing.mp4")):
        refusal = _refusal(entry)
        assert refusal.reason == "undecodable_video" and str(refusal).startswith("video 0: "), (refusal, entry[:20])
    assert _refusal(str(tmp_path)).reason == "bad_video_file"
    assert _refusal(encoded_clip(frame_arrays(1, 56, 84), 4)).reason == "unusable_video"


def test_oversized_clip_frames_are_refused_before_decoding(monkeypatch):
    """Invariant: a clip whose frames exceed the decode bound of data.video.max_pixels is refused from its
    header (the same 64 x max_pixels rule as images; the 16 MP floor lowered here to keep the clip small)."""
    monkeypatch.setattr("mmrl_megatron.data.images.ALWAYS_DECODED_PIXELS", 0)
    clip = encoded_clip(frame_arrays(4, 56, 84), 4)
    refusal = _refusal(clip, VideoConfig(min_pixels=16, max_pixels=56 * 84 // 64 - 1))
    assert refusal.reason == "oversized_video" and "data.video.max_pixels" in str(refusal)
    frames = png_frames(frame_arrays(2, 56, 84))
    assert _refusal(frames, VideoConfig(min_pixels=16, max_pixels=56 * 84 // 64 - 1)).reason == "oversized_video"


def test_clip_without_pyav_says_how_to_install(monkeypatch):
    """Invariant: without PyAV an encoded clip is skipped with the install command; frame lists need no decoder."""
    clip = encoded_clip(frame_arrays(4, 28, 28), 4)
    monkeypatch.setitem(__import__("sys").modules, "av", None)
    refusal = _refusal(clip)
    assert refusal.reason == "video_decoder_missing" and "pip install 'mmrl_megatron[video]'" in str(refusal)
    assert len(_video(png_frames(frame_arrays(2, 28, 28))).frames) == 2


@pytest.mark.parametrize("entry,reason", [
    ({"video": "clip.mp4", "fps": 2, "nframes": 4}, "wrong_type"), ({"video": "clip.mp4", "fps": -1}, "wrong_type"),
    ({"video": "clip.mp4", "nframes": "4"}, "wrong_type"), ({"video": "clip.mp4", "video_start": 1.0},
                                                            "unsupported_video_setting"),
    (42, "wrong_type"), ([], "wrong_type"), ({"video": None, "bytes": None}, "wrong_type")])
def test_malformed_entries_are_refused_when_parsed(entry, reason):
    """Invariant: an entry of no known form, or a setting that is not a positive number (or one this loader does not
    apply), is refused while parsing the row, with its counter reason."""
    with pytest.raises(SkippedRow) as raised:
        parse_videos([entry])
    assert raised.value.reason == reason and "video 0" in str(raised.value)


def test_frames_of_different_sizes_are_refused():
    """Invariant: a video's frames must share one size (they become one grid of patches)."""
    frames = png_frames(frame_arrays(1, 56, 84) + frame_arrays(1, 84, 56))
    assert _refusal(frames).reason == "unusable_video"

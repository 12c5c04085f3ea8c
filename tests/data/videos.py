"""Video clips made in code for data and model tests: frames as arrays, PNG frame lists, encoded clips (PyAV),
and qwen-vl-utils (the video rules verl uses) imported without torchvision."""
import functools
import importlib
import importlib.util
import io
import sys
import types
from typing import List
from unittest import mock

import numpy as np
import pytest
from PIL import Image


def frame_arrays(count: int, height: int, width: int, seed: int = 0) -> List[np.ndarray]:
    """`count` distinct RGB frames [height, width, 3] uint8: random noise, so any mix-up of frames shows."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in range(count)]


def png_frames(frames: List[np.ndarray]) -> List[bytes]:
    encoded = []
    for frame in frames:
        buffer = io.BytesIO()
        Image.fromarray(frame).save(buffer, format="PNG")
        encoded.append(buffer.getvalue())
    return encoded


def encoded_clip(frames: List[np.ndarray], fps: int, codec: str = "ffv1", container: str = "matroska") -> bytes:
    """The frames as an encoded clip at `fps` (ffv1 in Matroska is lossless: decoding gives the frames back)."""
    av = pytest.importorskip("av")
    buffer = io.BytesIO()
    height, width = frames[0].shape[:2]
    with av.open(buffer, "w", format=container) as output:
        stream = output.add_stream(codec, rate=fps)
        stream.width, stream.height = width, height
        stream.pix_fmt = "bgr0" if codec == "ffv1" else "yuv420p"
        for frame in frames:
            output.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        output.mux(stream.encode())
    return buffer.getvalue()


@functools.cache
def qwen_vl_utils():
    """qwen_vl_utils.vision_process (skipped when not installed). It imports torchvision at the top but the rules
    compared here (smart_nframes, smart_resize) never call it, so where torchvision is absent a stand-in module
    serves the import and is removed again at once."""
    if importlib.util.find_spec("qwen_vl_utils") is None:
        pytest.skip("qwen-vl-utils is not installed (pip install -e '.[test]')")
    if importlib.util.find_spec("torchvision") is not None:
        return importlib.import_module("qwen_vl_utils.vision_process")
    stand_in = types.ModuleType("torchvision")
    stand_in.__version__ = "0.0.0"
    stand_in.io = types.ModuleType("torchvision.io")
    stand_in.transforms = types.ModuleType("torchvision.transforms")
    stand_in.transforms.InterpolationMode = types.SimpleNamespace(BICUBIC="bicubic")
    modules = {"torchvision": stand_in, "torchvision.io": stand_in.io, "torchvision.transforms": stand_in.transforms}
    with mock.patch.dict(sys.modules, modules):
        return importlib.import_module("qwen_vl_utils.vision_process")

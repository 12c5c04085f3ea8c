"""What differs between model families on the data path, as data: PromptProcessor (data/processor.py) reads
the family of a checkpoint's config.json model_type and is otherwise the same for every family.

Each family's chat template writes one image span per image, `vision_start ... image_pad ... vision_end`
(Qwen2.5-VL: <|vision_start|><|image_pad|><|vision_end|>; Kimi-VL:
<|media_start|>image<|media_content|><|media_pad|><|media_end|>), and, for a family that takes videos, one
span per video with its video pad (Qwen2.5-VL: <|vision_start|><|video_pad|><|vision_end|>); the processor
expands each pad to its image's or video's token count and never truncates inside a span.
"""
import json
import os
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

from mmrl_megatron.data.errors import DataError
from mmrl_megatron.data.kimi_vl_images import KimiVLImageProcessor
from mmrl_megatron.data.qwen2_5_vl_images import Qwen2_5_VLImageProcessor
from mmrl_megatron.data.qwen2_5_vl_video import Qwen2_5_VLVideoProcessor
from mmrl_megatron.data.types import ProcessedImages, ProcessedVideo
from mmrl_megatron.data.videos import VideoEntry
from mmrl_megatron.models import family_of

# called on a prompt's PIL images (raises SkippedRow when unusable); has merge_size, patches merged per side
ImageProcessor = Callable[[List], ProcessedImages]
# called on one VideoEntry and its name in messages ("video 0"; raises SkippedRow when unusable)
VideoProcessor = Callable[[VideoEntry, str], ProcessedVideo]


@dataclass(frozen=True)
class VisionFamily:
    image_pad: str  # written once per image by the chat template, expanded to tokens_per_image copies
    vision_start: str  # the first and last token of the template's image span
    vision_end: str
    end_of_turn: str  # closes a chat turn: the supervised warm-up ends its answers with it
    load_image_processor: Callable[[str, object], ImageProcessor]  # (model_dir, data config)
    video_pad: Optional[str] = None  # None: the family takes no videos (rows with videos are skipped)
    load_video_processor: Optional[Callable[[str, object], VideoProcessor]] = None  # (model_dir, data config)


FAMILIES = {
    "qwen2_5_vl": VisionFamily("<|image_pad|>", "<|vision_start|>", "<|vision_end|>", "<|im_end|>",
                               Qwen2_5_VLImageProcessor, "<|video_pad|>", Qwen2_5_VLVideoProcessor),
    "kimi_vl": VisionFamily("<|media_pad|>", "<|media_start|>", "<|media_end|>", "<|im_end|>",
                            KimiVLImageProcessor.from_pretrained),
}


def vision_family(model_dir: str) -> Tuple[str, VisionFamily]:
    """(name, family) of model_dir/config.json's model_type; DataError naming the file when it has none we know."""
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        raise DataError(f"{path} not found: point model.hf_path at a Hugging Face checkpoint directory")
    with open(path) as handle:
        name = family_of(None, json.load(handle))
    if name not in FAMILIES:
        raise DataError(f"{path} has model_type {name!r}; the data path knows {sorted(FAMILIES)}")
    return name, FAMILIES[name]

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch

from mmrl_megatron.models.common.media import ProcessedImages, ProcessedVideo  # noqa: F401 (data's types)


@dataclass
class PromptSample:
    """One processed prompt, ready for the rollout engine and the trainer.

    prompt_ids: chat-templated token ids with each image's pad token expanded to its patch count.
    pixel_values: float32 patches of every image and video, in prompt order (None without either): Qwen2.5-VL
        [num_patches, channels * temporal_patch * patch * patch], Kimi-VL [num_patches, channels, patch, patch].
    image_grid_thw: [num_images + num_videos, 3] LongTensor (t, h, w) in patches, one row per image or video in
        prompt order (the pad token before it says which); t = 1 for images (None without either).
    second_per_grid_ts: seconds per temporal patch of each video, in prompt order (empty without videos).
    images: the encoded images as the model sees them (after augmentation), for engines that take bytes.
    prompt_text: the templated prompt with one pad token per image (the form a processor or SGLang takes).
    messages: the chat as parsed (content parts {"type": "image"} / {"type": "text", "text": ...}).
    index: the row's position in the concatenated input files (stable across epochs and resumes).
    """
    index: int
    prompt_ids: List[int]
    pixel_values: Optional[torch.Tensor]
    image_grid_thw: Optional[torch.Tensor]
    images: List[bytes]
    prompt_text: str
    ground_truth: Any
    data_source: str
    extra_info: Dict[str, Any] = field(default_factory=dict)
    messages: List[Dict[str, Any]] = field(default_factory=list)
    ability: str = ""
    truncated: bool = False  # data.overlong_prompt=truncate removed text tokens from this prompt
    second_per_grid_ts: List[float] = field(default_factory=list)

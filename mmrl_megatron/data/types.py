from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch


@dataclass
class PromptSample:
    """One processed prompt, ready for the rollout engine and the trainer.

    prompt_ids: chat-templated token ids with each image's pad token expanded to its patch count.
    pixel_values: [num_patches, channels * temporal_patch * patch * patch] float32 (None without images).
    image_grid_thw: [num_images, 3] LongTensor in patches (None without images).
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

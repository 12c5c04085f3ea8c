"""Turn a parsed row into a PromptSample: chat template, image processing, pad expansion, length limit.

transformers' Qwen2_5_VLProcessor cannot be constructed without torchvision, so this loads the image
processor (AutoImageProcessor) and the tokenizer separately and expands each image pad token itself,
exactly as the processor does: grid_t * grid_h * grid_w / merge_size^2 copies per image, in order.
"""
import random
import re
from typing import List, Optional


from mmrl_megatron.data.errors import DataError, SkippedRow
from mmrl_megatron.data.format import ParsedRow
from mmrl_megatron.data.images import augment_image, decode_images, encode_png
from mmrl_megatron.data.types import PromptSample

IMAGE_PAD, VISION_START, VISION_END = "<|image_pad|>", "<|vision_start|>", "<|vision_end|>"


def truncate_text_middle(ids: List[int], protected: List[bool], max_length: int) -> Optional[List[int]]:
    """Drop unprotected (text) tokens from the middle of the sequence until it fits, so the system/user header and
    the generation prompt at the end survive and no image is cut; None when the protected tokens alone exceed it."""
    excess = len(ids) - max_length
    removable = [position for position, keep in enumerate(protected) if not keep]
    if excess > len(removable):
        return None
    kept_text = len(removable) - excess
    dropped = set(removable[(kept_text + 1) // 2:(kept_text + 1) // 2 + excess])
    return [token for position, token in enumerate(ids) if position not in dropped]


class PromptProcessor:
    """Processes rows for one model directory under one data config (min/max pixels, length limit, augmentation)."""

    def __init__(self, model_dir: str, data_config):
        from transformers import AutoImageProcessor, AutoTokenizer

        self.config = data_config
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        # min_pixels/max_pixels keys in preprocessor_config.json override `size`, so pass them too
        self.image_processor = AutoImageProcessor.from_pretrained(
            model_dir, size={"shortest_edge": data_config.min_pixels, "longest_edge": data_config.max_pixels},
            min_pixels=data_config.min_pixels, max_pixels=data_config.max_pixels)
        self.merge_size = self.image_processor.merge_size
        token_ids = {token: self.tokenizer.convert_tokens_to_ids(token) for token in (IMAGE_PAD, VISION_START, VISION_END)}
        if any(value is None or value == self.tokenizer.unk_token_id for value in token_ids.values()):
            raise DataError(f"{model_dir}: the tokenizer lacks the Qwen vision tokens {list(token_ids)}")
        self.image_token_id = token_ids[IMAGE_PAD]
        self.vision_start_token_id = token_ids[VISION_START]
        self.protected_ids = set(token_ids.values())
        self.model_dir = model_dir

    def _images(self, parsed: ParsedRow, augment_seed: Optional[int]):
        images = decode_images(parsed.images)
        augment = self.config.augment
        if augment_seed is None or (augment.rotation_degrees <= 0 and augment.crop_fraction <= 0):
            return images, parsed.images
        rng = random.Random(augment_seed)
        images = [augment_image(image, rng, augment.rotation_degrees, augment.crop_fraction) for image in images]
        return images, [encode_png(image) for image in images]

    def process(self, parsed: ParsedRow, index: int, augment_seed: Optional[int] = None) -> PromptSample:
        """The sample for one row; raises SkippedRow (with its counter reason) for rows that cannot be used.
        `augment_seed` enables data.augment for this sample (training); None leaves images untouched."""
        images, encoded = self._images(parsed, augment_seed)
        text = self.tokenizer.apply_chat_template(parsed.messages, tokenize=False, add_generation_prompt=True)
        if text.count(IMAGE_PAD) != len(images):
            raise DataError(f"{self.model_dir}: the chat template rendered {text.count(IMAGE_PAD)} image pads for "
                            f"{len(images)} images; use the model's own Qwen2.5-VL chat template")
        pixel_values = grid = None
        token_counts = []
        if images:
            try:
                processed = self.image_processor(images=images, return_tensors="pt")
            except (ValueError, RuntimeError) as error:
                raise SkippedRow("unprocessable_image", f"image processor rejected the images: {error}") from error
            pixel_values, grid = processed["pixel_values"], processed["image_grid_thw"].long()
            token_counts = (grid.prod(dim=-1) // self.merge_size ** 2).tolist()
        ids = self._expand_image_pads(self.tokenizer.encode(text, add_special_tokens=False), token_counts)
        fitted_ids, text = self._fit_length(ids, text)
        return PromptSample(index=index, prompt_ids=fitted_ids, pixel_values=pixel_values, image_grid_thw=grid,
                            images=encoded, prompt_text=text, ground_truth=parsed.ground_truth,
                            data_source=parsed.data_source, extra_info=parsed.extra_info,
                            messages=parsed.messages, ability=parsed.ability,
                            truncated=len(fitted_ids) < len(ids))

    def _expand_image_pads(self, ids: List[int], token_counts: List[int]) -> List[int]:
        counts = iter(token_counts)
        expanded = []
        for token in ids:
            expanded.extend([token] * next(counts) if token == self.image_token_id else [token])
        return expanded

    def _fit_length(self, ids: List[int], text: str):
        limit = self.config.max_prompt_length
        if len(ids) <= limit:
            return ids, text
        if self.config.overlong_prompt == "filter":
            raise SkippedRow("overlong_prompt", f"prompt has {len(ids)} tokens (images included), limit {limit}")
        truncated = truncate_text_middle(ids, [token in self.protected_ids for token in ids], limit)
        if truncated is None:
            raise SkippedRow("overlong_prompt", f"image tokens alone exceed the limit of {limit} tokens")
        text = self.tokenizer.decode(truncated, skip_special_tokens=False)
        return truncated, re.sub(f"(?:{re.escape(IMAGE_PAD)})+", IMAGE_PAD, text)

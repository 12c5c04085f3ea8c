"""Turn a parsed row into a PromptSample: chat template, image and video processing, pad expansion, length limit.

The same steps for every model family; what differs (the image and video pads and span tokens, the image and
video processors, how many pads an image or video stands for) is the family's (FAMILY.media and its processors,
models/<family>/__init__.py), chosen by the checkpoint's config.json model_type. Each pad is expanded as the
family's own processor does: its image's or video's token count, in prompt order; the patches of images and
videos are concatenated in that same order.
"""
import os
import random
import re
from typing import List, Optional

import torch

from mmrl_megatron.data.errors import DataError, SkippedRow
from mmrl_megatron.data.format import ParsedRow
from mmrl_megatron.data.images import augment_image, decode_images, encode_png
from mmrl_megatron.data.types import ProcessedImages, ProcessedVideo, PromptSample
from mmrl_megatron.data.videos import load_video
from mmrl_megatron.models.errors import ModelError
from mmrl_megatron.models.family import family_for
from mmrl_megatron.models.hf_config import hf_config_path, read_hf_config

# transformers builds an empty tokenizer from config.json alone, so the directory is checked for these first
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


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


def image_span_mask(ids: List[int], start_id: int, end_id: int) -> List[bool]:
    """True for every token from an image span's start token through its end token, inclusive."""
    mask, inside = [], False
    for token in ids:
        inside = inside or token == start_id
        mask.append(inside)
        inside = inside and token != end_id
    return mask


def load_tokenizer(model_dir: str):
    """model_dir's tokenizer; DataError naming the directory when it has none or it does not load."""
    from transformers import AutoTokenizer

    if not any(os.path.isfile(os.path.join(model_dir, name)) for name in TOKENIZER_FILES):
        raise DataError(f"{model_dir} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); point at a "
                        "complete Hugging Face model directory, or copy the tokenizer files into it")
    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as error:
        raise DataError(f"{model_dir}: its tokenizer cannot be loaded ({str(error).splitlines()[0]})") from error


class PromptProcessor:
    """Processes rows for one model directory under one data config (min/max pixels, length limit, augmentation).

    Token ids (image_token_id / video_token_id: the expanded pads, video None for a family without videos;
    vision_start/end_token_id: the image span's ends; end_of_turn_token_id) and merge_size (patches merged per
    image token, per side) are the checkpoint's."""

    def __init__(self, model_dir: str, data_config):
        self.config = data_config
        self.model_dir = model_dir
        try:
            hf_config = read_hf_config(model_dir)
            model_family = family_for(hf_config)
        except ModelError as error:
            raise DataError(f"{hf_config_path(model_dir)}: {error}") from error
        self.family_name, self.family = model_family.model_type, model_family.media
        self.tokenizer = load_tokenizer(model_dir)
        try:
            self.image_processor = model_family.load_image_processor(model_dir, data_config)
            loader = model_family.load_video_processor
            self.video_processor = loader(model_dir, data_config) if loader else None
        except ModelError as error:
            raise DataError(str(error)) from error
        except (OSError, ValueError) as error:  # transformers' message is a paragraph; its first sentence names it
            raise DataError(f"{model_dir}: its image processor cannot be loaded "
                            f"({str(error).split('. ')[0]}); it needs preprocessor_config.json") from error
        family = self.family
        pads = tuple(pad for pad in (family.image_pad, family.video_pad) if pad)
        tokens = (*pads, family.vision_start, family.vision_end, family.end_of_turn)
        token_ids = {token: self.tokenizer.convert_tokens_to_ids(token) for token in tokens}
        if any(value is None or value == self.tokenizer.unk_token_id for value in token_ids.values()):
            raise DataError(f"{model_dir}: the tokenizer lacks the {self.family_name} tokens {list(token_ids)}")
        self.image_tokens = (*pads, family.vision_start, family.vision_end)
        self.image_token_id = token_ids[family.image_pad]
        self.video_token_id = token_ids.get(family.video_pad)
        self.vision_start_token_id, self.vision_end_token_id = (token_ids[family.vision_start],
                                                                token_ids[family.vision_end])
        self.end_of_turn_token_id = token_ids[family.end_of_turn]
        self.merge_size = self.image_processor.merge_size

    def _refuse_image_tokens_in_text(self, parsed: ParsedRow) -> None:
        """The template writes the image tokens once per image; the same text in a prompt would be read as one
        more image (or a broken span), so such a row is skipped, not the run stopped."""
        for message in parsed.messages:
            for part in message["content"]:
                found = [token for token in self.image_tokens if part["type"] == "text" and token in part["text"]]
                if found:
                    raise SkippedRow("image_token_in_text", f"a {message['role']} message's text contains the "
                                     f"literal image token {found[0]}; remove it from the prompt")

    def _images(self, parsed: ParsedRow, augment_seed: Optional[int]):
        images = decode_images(parsed.images, self.config.max_pixels)
        augment = self.config.augment
        if augment_seed is None or (augment.rotation_degrees <= 0 and augment.crop_fraction <= 0):
            return images, parsed.images
        rng = random.Random(augment_seed)
        images = [augment_image(image, rng, augment.rotation_degrees, augment.crop_fraction) for image in images]
        return images, [encode_png(image) for image in images]

    def _videos(self, parsed: ParsedRow) -> List[ProcessedVideo]:
        if parsed.videos and self.video_processor is None:
            raise SkippedRow("video_unsupported", f"the row has {len(parsed.videos)} video(s) but {self.family_name} "
                             "takes no videos; use a model that does (Qwen2.5-VL) or drop the videos column")
        return [self.process_video(entry, f"video {number}") for number, entry in enumerate(parsed.videos)]

    def process_video(self, entry, what: str = "video") -> ProcessedVideo:
        """One video's frames sampled and sized under data.video for the family's processor, then patched by it."""
        processor = self.video_processor
        frames = load_video(entry, self.config.video, processor.frame_factor, processor.temporal_patch_size, what)
        return processor(frames, what)

    def _check_rendered_pads(self, text: str, images: int, videos: int) -> None:
        for pad, count in ((self.family.image_pad, images), (self.family.video_pad, videos)):
            if pad and text.count(pad) != count:
                raise DataError(f"{self.model_dir}: the chat template rendered {text.count(pad)} pads {pad} for "
                                f"{count} images/videos; use the model's own {self.family_name} chat template")

    def process(self, parsed: ParsedRow, index: int, augment_seed: Optional[int] = None) -> PromptSample:
        """The sample for one row; raises SkippedRow (with its counter reason) for rows that cannot be used.
        `augment_seed` enables data.augment for this sample's images (training); None leaves them untouched."""
        self._refuse_image_tokens_in_text(parsed)
        images, encoded = self._images(parsed, augment_seed)
        videos = self._videos(parsed)
        text = self.tokenizer.apply_chat_template(parsed.messages, tokenize=False, add_generation_prompt=True)
        self._check_rendered_pads(text, len(images), len(videos))
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        pixel_values, grid, token_counts = self._visual_inputs(ids, self.image_processor(images) if images else None,
                                                               videos)
        expanded = self.expand_pads(ids, token_counts)
        fitted_ids, text = self._fit_length(expanded, text)
        return PromptSample(index=index, prompt_ids=fitted_ids, pixel_values=pixel_values, image_grid_thw=grid,
                            images=encoded, prompt_text=text, ground_truth=parsed.ground_truth,
                            data_source=parsed.data_source, extra_info=parsed.extra_info,
                            messages=parsed.messages, ability=parsed.ability,
                            truncated=len(fitted_ids) < len(expanded),
                            second_per_grid_ts=[video.second_per_grid_t for video in videos])

    def _visual_inputs(self, ids: List[int], images: Optional[ProcessedImages], videos: List[ProcessedVideo]):
        """(patches, grid rows, token counts) of every image and video in the order their pads take in `ids`;
        (None, None, []) without either."""
        if images is None and not videos:
            return None, None, []
        image_items = iter(())
        if images is not None:
            rows = images.pixel_values.split(images.image_grid_thw.prod(-1).tolist())
            image_items = iter(zip(rows, images.image_grid_thw.split(1), images.tokens_per_image))
        video_items = iter((video.pixel_values, video.grid_thw, video.tokens) for video in videos)
        items = [next(image_items if token == self.image_token_id else video_items)
                 for token in ids if token in (self.image_token_id, self.video_token_id)]
        pixels, grids, counts = zip(*items)
        return torch.cat(pixels), torch.cat(grids), list(counts)

    def expand_pads(self, ids: List[int], token_counts: List[int]) -> List[int]:
        """ids with the i-th image or video pad repeated token_counts[i] times."""
        counts = iter(token_counts)
        expanded = []
        for token in ids:
            pad = token in (self.image_token_id, self.video_token_id)
            expanded.extend([token] * next(counts) if pad else [token])
        return expanded

    def _fit_length(self, ids: List[int], text: str):
        limit = self.config.max_prompt_length
        if len(ids) <= limit:
            return ids, text
        if self.config.overlong_prompt == "filter":
            raise SkippedRow("overlong_prompt", f"prompt has {len(ids)} tokens (images included), limit {limit}")
        protected = image_span_mask(ids, self.vision_start_token_id, self.vision_end_token_id)
        truncated = truncate_text_middle(ids, protected, limit)
        if truncated is None:
            raise SkippedRow("overlong_prompt", f"image tokens alone exceed the limit of {limit} tokens")
        text = self.tokenizer.decode(truncated, skip_special_tokens=False)
        for pad in (self.family.image_pad, self.family.video_pad):
            text = re.sub(f"(?:{re.escape(pad)})+", pad, text) if pad else text
        return truncated, text

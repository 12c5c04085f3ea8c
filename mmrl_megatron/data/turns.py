"""The tokens of an environment turn between two assistant turns of a conversation (a tool's or the user's reply),
written by the model's own chat template, with its images processed and their pads expanded as in a prompt.

The template is asked for the text a turn adds after a short fixed conversation (the difference between
rendering it with and without the turn, as verl's and slime's multi-turn rollouts do), so any template that
renders turns one after another works; the turn starts with whatever the template writes after an assistant
turn's content that generation did not already produce (Qwen2.5-VL: "\\n" after a sampled <|im_end|>, or
"<|im_end|>\\n" after a stop string) and ends with the generation prompt of the next assistant turn.
"""
from dataclasses import dataclass
from typing import List, Optional, Sequence, Union

import torch
from PIL import Image

from mmrl_megatron.data.errors import DataError, SkippedRow
from mmrl_megatron.data.images import decode_images, encode_png
from mmrl_megatron.data.processor import PromptProcessor

# stands for an assistant turn's content while the template is rendered; found again by exact match
_ASSISTANT_CONTENT = "<<assistant turn content>>"
_BASE_CONVERSATION = [{"role": "user", "content": [{"type": "text", "text": "question"}]},
                      {"role": "assistant", "content": [{"type": "text", "text": _ASSISTANT_CONTENT}]}]


@dataclass
class EncodedTurn:
    """One environment turn: its token ids (image pads expanded) and its images, processed and encoded."""

    ids: List[int]
    pixel_values: Optional[torch.Tensor]
    image_grid_thw: Optional[torch.Tensor]  # [images, 3]
    images: List[bytes]  # as the model sees them, for engines that process images themselves (SGLang)


class TurnEncoder:
    """Encodes environment turns for the model of one PromptProcessor (tokenizer, template, image processor)."""

    def __init__(self, processor: PromptProcessor):
        self.processor = processor
        self._base_text = self._render(_BASE_CONVERSATION, add_generation_prompt=False)
        self._closing = self._base_text[self._base_text.rindex(_ASSISTANT_CONTENT) + len(_ASSISTANT_CONTENT):]
        # the family's image span tokens: an assistant turn holding one cannot be continued (see multi_turn.py)
        self.image_token_ids = {processor.tokenizer.convert_tokens_to_ids(token) for token in processor.image_tokens}

    def _render(self, messages, add_generation_prompt: bool) -> str:
        return self.processor.tokenizer.apply_chat_template(messages, tokenize=False,
                                                             add_generation_prompt=add_generation_prompt)

    def _turn_text(self, role: str, text: str, image_count: int, after_end_of_turn: bool) -> str:
        content = ([{"type": "text", "text": text}] if text else []) + [{"type": "image"}] * image_count
        rendered = self._render(_BASE_CONVERSATION + [{"role": role, "content": content}], add_generation_prompt=True)
        if not rendered.startswith(self._base_text):
            raise DataError(f"{self.processor.model_dir}: the chat template renders earlier turns differently once a "
                            f"{role!r} turn follows them, so the turn's tokens cannot be appended")
        closing = self._closing
        end_of_turn = self.processor.family.end_of_turn
        if after_end_of_turn and closing.startswith(end_of_turn):
            closing = closing[len(end_of_turn):]  # generation already wrote it
        return closing + rendered[len(self._base_text):]

    def encode(self, role: str, text: str, images: Sequence[Union[bytes, Image.Image]],
               after: Sequence[int]) -> EncodedTurn:
        """The turn following the assistant turn whose generated ids are `after`. DataError when the text holds the
        family's image tokens, an image cannot be used, or the template writes a different number of image pads."""
        found = [token for token in self.processor.image_tokens if token in text]
        if found:
            raise DataError(f"the environment's text contains the literal image token {found[0]}; it would be read "
                            "as an image")
        encoded = [image if isinstance(image, bytes) else encode_png(image) for image in images]
        ended = bool(after) and after[-1] == self.processor.end_of_turn_token_id
        turn_text = self._turn_text(role, text, len(encoded), ended)
        pad = self.processor.family.image_pad
        if turn_text.count(pad) != len(encoded):
            raise DataError(f"{self.processor.model_dir}: the chat template wrote {turn_text.count(pad)} image pads "
                            f"{pad} for the {len(encoded)} images of a {role!r} turn")
        pixel_values = grid = None
        counts: List[int] = []
        if encoded:
            try:
                processed = self.processor.image_processor(decode_images(encoded, self.processor.config.max_pixels))
            except SkippedRow as error:
                raise DataError(f"an image of the environment's turn cannot be used: {error}") from error
            pixel_values, grid, counts = processed.pixel_values, processed.image_grid_thw, processed.tokens_per_image
        ids = self.processor.expand_pads(
            self.processor.tokenizer.encode(turn_text, add_special_tokens=False), counts)
        return EncodedTurn(ids, pixel_values, grid, encoded)


"""Qwen2.5-VL as one pipeline stage of megatron-core modules.

The language model is megatron-core's GPTModel with multimodal RoPE (3-axis position ids); the first
stage also holds the vision tower, whose merged-patch embeddings replace the <|image_pad|> and <|video_pad|>
token embeddings before the decoder (a video's frames are patches of the same tower, temporal_patch_size
frames to a patch). Actor/reference stages end in the (TP-sharded) vocabulary projection,
critic stages in a scalar value head.
"""
from typing import Optional

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.enums import ModelType
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.module import MegatronModule

from ..common.image_placement import place_image_features
from ..common.output_rows import OutputRows
from ..common.packing import as_packed_segments
from ..common.value_head import ValueHead
from ..errors import ModelError
from .hf_config import Qwen25VLShape
from .vision import VisionModel


class Qwen25VLModel(MegatronModule):
    """forward(input_ids [b, s], position_ids [3, b, s], packed_seq_params, pixel_values, image_grid_thw).

    Last stage: logits [b, s, padded_vocab / TP] with the padding columns at -inf ("actor"), or values
    [b, s] ("critic"); other stages: hidden states [s, b, h] for the pipeline schedule. Packed input is
    b = 1 with `packed_seq_params` (packing.PackedSegments, or megatron's THD PackedSeqParams); padded input is
    any b with packed_seq_params None. pixel_values and image_grid_thw hold every image and video, in the order
    of their pads in input_ids; image_grid_thw stays on the host (it sizes the vision tower's windows).
    prompt_mask [b, s] (True on prompt tokens) limits image placement to prompts: a sampled response may hold
    the <|image_pad|> id as an ordinary token, as the rollout engines treat it; None: every pad is an image's.
    output_rows [R] (packed input): only these stream positions reach the output layer, and the last stage
    returns [1, R, ...] in their order (output_rows.py)."""

    def __init__(self, language_config, vision_config, shape: Qwen25VLShape, role: str, language_spec,
                 vision_spec, padded_vocab_size: int) -> None:
        super().__init__(config=language_config)
        self.shape, self.role = shape, role
        self.pre_process = parallel_state.is_pipeline_first_stage()
        self.post_process = parallel_state.is_pipeline_last_stage()
        self.padded_vocab_size = padded_vocab_size
        text = shape.text
        self.language_model = GPTModel(
            config=language_config, transformer_layer_spec=language_spec, vocab_size=padded_vocab_size,
            max_sequence_length=text.max_position_embeddings, pre_process=self.pre_process,
            post_process=self.post_process, parallel_output=True,
            share_embeddings_and_output_weights=text.tie_word_embeddings and role != "critic",
            position_embedding_type="mrope", rotary_base=text.rope_theta)
        if role == "critic" and self.post_process:
            self.language_model.output_layer = ValueHead(language_config)
        self.output_rows = OutputRows(self.language_model)
        self.vision_model = VisionModel(vision_config, shape.vision, vision_spec) if self.pre_process else None
        self.model_type = ModelType.encoder_or_decoder  # what megatron-core's pipeline schedules look for
        self.share_embeddings_and_output_weights = self.language_model.share_embeddings_and_output_weights

    def shared_embedding_or_output_weight(self):
        """The tied embedding/output weight; megatron-core's finalize_model_grads all-reduces its gradient."""
        return self.language_model.shared_embedding_or_output_weight()

    def set_input_tensor(self, input_tensor) -> None:
        """The pipeline schedule hands the previous stage's activations here."""
        self.language_model.set_input_tensor(input_tensor)

    def _embed(self, input_ids, pixel_values, image_grid_thw, prompt_mask) -> torch.Tensor:
        """[s, b, h] token embeddings with the vision tower's outputs in place of the image- and video-pad tokens."""
        embeddings = self.language_model.embedding(input_ids=input_ids, position_ids=None)
        vision_pads = input_ids == self.shape.image_token_id
        if self.shape.video_token_id is not None:
            vision_pads = vision_pads | (input_ids == self.shape.video_token_id)
        if prompt_mask is not None:
            vision_pads = vision_pads & prompt_mask
        if not input_ids.is_cuda:  # on a GPU, reading the count back would stall the stream in every forward
            self._check_image_tokens(int(vision_pads.sum()), image_grid_thw if pixel_values is not None else None)
        if pixel_values is None:
            return embeddings
        image_embeddings = self.vision_model(pixel_values, image_grid_thw)
        # features are in batch order, so place them in [b, s, h]
        batch_major = place_image_features(embeddings.transpose(0, 1), vision_pads, image_embeddings)
        return batch_major.transpose(0, 1).contiguous()

    def _check_image_tokens(self, count: int, image_grid_thw: Optional[torch.Tensor]) -> None:
        """One image- or video-pad token per merged patch of the images and videos given (none without pixel_values)."""
        unit = self.shape.vision.spatial_merge_size ** 2
        merged = 0 if image_grid_thw is None else int(image_grid_thw.prod(-1).sum()) // unit
        if count != merged:
            raise ModelError(f"input_ids hold {count} image/video-pad tokens but pixel_values/image_grid_thw describe "
                             f"{merged} merged patches; expand each <|image_pad|> or <|video_pad|> to "
                             "grid_t*grid_h*grid_w/merge_size**2 copies (and pass pixel_values with them)")

    def _mask_vocab_padding(self, logits: torch.Tensor) -> torch.Tensor:
        """-inf on the columns that only pad the vocabulary to a TP multiple: they are not tokens."""
        shard = logits.shape[-1]
        first = parallel_state.get_tensor_model_parallel_rank() * shard
        real = self.shape.text.vocab_size - first
        if real >= shard:
            return logits
        padding = torch.arange(shard, device=logits.device) >= real
        return logits.masked_fill(padding, float("-inf"))

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                packed_seq_params: Optional[PackedSeqParams] = None, pixel_values: Optional[torch.Tensor] = None,
                image_grid_thw: Optional[torch.Tensor] = None,
                prompt_mask: Optional[torch.Tensor] = None, output_rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        decoder_input = None
        if packed_seq_params is not None:
            packed_seq_params = as_packed_segments(packed_seq_params).as_one_stream()
        if self.pre_process:
            decoder_input = self._embed(input_ids, pixel_values, image_grid_thw, prompt_mask)
        with self.output_rows.only(output_rows):
            output = self.language_model(input_ids, position_ids, attention_mask=None, decoder_input=decoder_input,
                                         packed_seq_params=packed_seq_params)
        if not self.post_process:
            return output
        if self.role == "critic":
            return output.squeeze(-1)
        return self._mask_vocab_padding(output)

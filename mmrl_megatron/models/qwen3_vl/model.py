"""Qwen3-VL as one pipeline stage of megatron-core modules.

The language model is megatron-core's GPTModel (QK-norm, no attention biases) with Qwen3-VL's interleaved
M-RoPE (rotary.py) in place of megatron's sectioned one; the first stage also holds the vision tower, whose
merged-patch embeddings replace the <|image_pad|> and <|video_pad|> token embeddings before the decoder and
whose DeepStack features are added at those tokens after the first decoder layers (deepstack.py). Those layers
must therefore sit on the first stage (build.py checks). Actor/reference stages end in the (TP-sharded)
vocabulary projection, critic stages in a scalar value head.
"""
from typing import Optional

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import ModelType
from megatron.core.transformer.module import MegatronModule

from ..common.image_placement import place_image_features
from ..common.output_rows import OutputRows
from ..common.packing import as_packed_segments
from ..common.value_head import ValueHead
from ..errors import ModelError
from .deepstack import deepstack_payload
from .geometry import Qwen3VLGeometry
from .rotary import InterleavedMultimodalRotaryEmbedding
from .vision import VisionModel


class Qwen3VLModel(MegatronModule):
    """forward(input_ids [b, s], position_ids [3, b, s], packed_seq_params, pixel_values, image_grid_thw,
    prompt_mask, output_rows): the contract of qwen2_5_vl.model.Qwen25VLModel.forward.

    Last stage: logits [b, s, padded_vocab / TP] with the padding columns at -inf ("actor"), or values [b, s]
    ("critic"); other stages: hidden states [s, b, h] for the pipeline schedule."""

    def __init__(self, language_config, vision_config, geometry: Qwen3VLGeometry, role: str, language_spec,
                 vision_spec, padded_vocab_size: int) -> None:
        super().__init__(config=language_config)
        self.geometry, self.role = geometry, role
        self.pre_process = parallel_state.is_pipeline_first_stage()
        self.post_process = parallel_state.is_pipeline_last_stage()
        self.padded_vocab_size = padded_vocab_size
        text = geometry.text
        self.language_model = GPTModel(
            config=language_config, transformer_layer_spec=language_spec, vocab_size=padded_vocab_size,
            max_sequence_length=text.max_position_embeddings, pre_process=self.pre_process,
            post_process=self.post_process, parallel_output=True,
            share_embeddings_and_output_weights=text.tie_word_embeddings and role != "critic",
            position_embedding_type="mrope", rotary_base=text.rope_theta)
        self.language_model.rotary_pos_emb = InterleavedMultimodalRotaryEmbedding(
            kv_channels=text.head_dim, rotary_percent=1.0, rotary_base=text.rope_theta)
        if role == "critic" and self.post_process:
            self.language_model.output_layer = ValueHead(language_config)
        self.output_rows = OutputRows(self.language_model)
        self.vision_model = VisionModel(vision_config, geometry.vision, vision_spec) if self.pre_process else None
        self.model_type = ModelType.encoder_or_decoder  # what megatron-core's pipeline schedules look for
        self.share_embeddings_and_output_weights = self.language_model.share_embeddings_and_output_weights

    def shared_embedding_or_output_weight(self):
        """The tied embedding/output weight; megatron-core's finalize_model_grads all-reduces its gradient."""
        return self.language_model.shared_embedding_or_output_weight()

    def set_input_tensor(self, input_tensor) -> None:
        """The pipeline schedule hands the previous stage's activations here."""
        self.language_model.set_input_tensor(input_tensor)

    def _vision_pads(self, input_ids, prompt_mask) -> torch.Tensor:
        pads = input_ids == self.geometry.image_token_id
        if self.geometry.video_token_id is not None:
            pads = pads | (input_ids == self.geometry.video_token_id)
        return pads if prompt_mask is None else pads & prompt_mask

    def _embed(self, input_ids, pixel_values, image_grid_thw, prompt_mask):
        """([s, b, h] embeddings with the tower's outputs at the vision pads, decoder kwargs carrying DeepStack)."""
        embeddings = self.language_model.embedding(input_ids=input_ids, position_ids=None)
        pads = self._vision_pads(input_ids, prompt_mask)
        if not input_ids.is_cuda:  # on a GPU, reading the count back would stall the stream in every forward
            self._check_image_tokens(int(pads.sum()), image_grid_thw if pixel_values is not None else None)
        if pixel_values is None:
            return embeddings, {}
        image_embeddings, deepstack = self.vision_model(pixel_values, image_grid_thw)
        batch_major = place_image_features(embeddings.transpose(0, 1), pads, image_embeddings)
        context, context_mask = deepstack_payload(deepstack, pads)
        return batch_major.transpose(0, 1).contiguous(), dict(context=context, context_mask=context_mask)

    def _check_image_tokens(self, count: int, image_grid_thw: Optional[torch.Tensor]) -> None:
        """One image- or video-pad token per merged patch of the images and videos given (none without pixel_values)."""
        unit = self.geometry.vision.spatial_merge_size ** 2
        merged = 0 if image_grid_thw is None else int(image_grid_thw.prod(-1).sum()) // unit
        if count != merged:
            raise ModelError(f"input_ids hold {count} image/video-pad tokens but pixel_values/image_grid_thw describe "
                             f"{merged} merged patches; expand each <|image_pad|> or <|video_pad|> to "
                             "grid_t*grid_h*grid_w/merge_size**2 copies (and pass pixel_values with them)")

    def _mask_vocab_padding(self, logits: torch.Tensor) -> torch.Tensor:
        """-inf on the columns that only pad the vocabulary to a TP multiple: they are not tokens."""
        shard = logits.shape[-1]
        real = self.geometry.text.vocab_size - parallel_state.get_tensor_model_parallel_rank() * shard
        if real >= shard:
            return logits
        return logits.masked_fill(torch.arange(shard, device=logits.device) >= real, float("-inf"))

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                packed_seq_params: Optional[PackedSeqParams] = None, pixel_values: Optional[torch.Tensor] = None,
                image_grid_thw: Optional[torch.Tensor] = None,
                prompt_mask: Optional[torch.Tensor] = None, output_rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        decoder_input, block_kwargs = None, {}
        if packed_seq_params is not None:
            packed_seq_params = as_packed_segments(packed_seq_params).as_one_stream()
        if self.pre_process:
            decoder_input, block_kwargs = self._embed(input_ids, pixel_values, image_grid_thw, prompt_mask)
        with self.output_rows.only(output_rows):
            output = self.language_model(input_ids, position_ids, attention_mask=None, decoder_input=decoder_input,
                                         packed_seq_params=packed_seq_params, extra_block_kwargs=block_kwargs)
        if not self.post_process:
            return output
        if self.role == "critic":
            return output.squeeze(-1)
        return self._mask_vocab_padding(output)

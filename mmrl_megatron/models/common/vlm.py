"""One pipeline stage of a vision-language model, composed from specs (megatron-core's LLaVAModel idea).

Every family is the same model around different parts: a language model (megatron-core's GPTModel over the
family's layer specs), a vision tower and projector on the first stage whose features replace the image pads'
token embeddings, and a head on the last stage. A family's build function describes its parts and
VisionLanguageModel puts them together:

- LanguageSpec: the decoder's config, layer spec and GPTModel settings, and so how it is called;
- VisionSpec: the first stage's modules under their checkpoint names, how they turn pixels into one feature
  row per image pad (and any context for the decoder, such as Qwen3-VL's DeepStack features), which token ids
  are image pads, which parameters are the tower and which the projector;
- a head (heads.py): vocabulary logits for the actor and reference, a scalar value for the critic.

What the families share lives here once: pre/post-processing from the pipeline stage, the image placement
(also under sequence parallelism), packed segments, the host-side image-pad count check, the output-row
selection and the hooks megatron-core's pipeline schedule calls.
"""
from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import torch
import torch.distributed as dist
from megatron.core import tensor_parallel
from megatron.core.models.gpt import GPTModel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import ModelType
from megatron.core.transformer.module import MegatronModule

from ...parallel import ParallelDims
from ..errors import ModelError
from .image_placement import place_image_features
from .output_rows import OutputRows
from .packing import append_padding_sequence, as_packed_segments

# (modules by name, pixel_values, image_grid_thw, image pads [b, s]) -> (features [pads, hidden], decoder kwargs)
Encode = Callable[[Mapping[str, torch.nn.Module], torch.Tensor, torch.Tensor, torch.Tensor],
                  Tuple[torch.Tensor, Dict[str, torch.Tensor]]]


@dataclass(frozen=True)
class LanguageSpec:
    """This stage's language model: megatron-core's GPTModel over `layer_spec` with these settings.

    position_embedding_type "mrope": position ids are per token ([3, b, s], M-RoPE), so a packed batch goes in
    as one stream whose attention keeps the sequences apart (packing.PackedSegments.as_one_stream); "rope":
    the attention numbers each packed sequence from 0 itself (Kimi-VL's MLA) and takes no position ids."""

    config: Any  # the decoder's TransformerConfig (MLATransformerConfig for MLA)
    layer_spec: Any  # this stage's decoder: a layer ModuleSpec or TransformerBlockSubmodules
    vocab_size: int  # rows of the embedding and the output layer (the vocabulary padded for TP)
    max_sequence_length: int
    position_embedding_type: str
    rotary_base: float
    tie_word_embeddings: bool
    rotary_embedding: Optional[Callable[[], torch.nn.Module]] = None  # replaces GPTModel's rotary_pos_emb


@dataclass(frozen=True)
class VisionSpec:
    """The first stage's image path. `build()` returns its modules by attribute name: the names are the
    checkpoint's (`vision_model`; `vision_tower` and `multi_modal_projector`), so rule tables and distributed
    checkpoints see them as before. Each image gives grid_t*grid_h*grid_w / patches_per_token feature rows,
    in the order of its pads; the freezing flags name parameter prefixes."""

    build: Callable[[], Dict[str, torch.nn.Module]]
    encode: Encode
    pad_token_ids: Tuple[int, ...]  # the tokens image and video features replace
    patches_per_token: int  # patches of image_grid_thw merged into one feature row
    tower_parameters: Tuple[str, ...] = ()  # frozen by model.freeze_vision_tower
    projector_parameters: Tuple[str, ...] = ()  # frozen by model.freeze_merger


class VisionLanguageModel(MegatronModule):
    """The stage of `dims` (a started parallel.ParallelDims) this rank holds: the first stage embeds and encodes
    images, the last applies the head.

    forward(input_ids [b, s], position_ids [3, b, s] (read by "mrope" language models only),
    packed_seq_params, pixel_values, image_grid_thw, prompt_mask, output_rows).

    Last stage: the head's output, logits [b, s, padded_vocab / TP] with the padding columns at -inf, or values
    [b, s]; other stages: hidden states [s, b, h] for the pipeline schedule. Packed input is b = 1 with
    `packed_seq_params` (packing.PackedSegments, or megatron's THD PackedSeqParams); padded input is any b with
    packed_seq_params None. pixel_values and image_grid_thw hold every image and video, in the order of their
    pads in input_ids; image_grid_thw stays on the host (it sizes the vision tower's windows). prompt_mask
    [b, s] (True on prompt tokens) limits image placement to prompts: a sampled response may hold a pad id as
    an ordinary token, as the rollout engines treat it; None: every pad is an image's. output_rows [R] (packed
    input): only these stream positions reach the head, and the last stage returns [1, R, ...] in their order
    (output_rows.py). An MoE or sequence-parallel decoder may grow the packed stream by one padding sequence
    (_stream_length); its outputs are cut off again, so callers see s positions."""

    def __init__(self, language: LanguageSpec, vision: VisionSpec, head, dims: ParallelDims) -> None:
        super().__init__(config=language.config)
        self.language, self.vision, self.head, self.dims = language, vision, head, dims
        self.pre_process = dims.is_first_stage
        self.post_process = dims.is_last_stage
        self.model_type = ModelType.encoder_or_decoder  # what megatron-core's pipeline schedules look for
        self.language_model = GPTModel(
            config=language.config, transformer_layer_spec=language.layer_spec, vocab_size=language.vocab_size,
            max_sequence_length=language.max_sequence_length, pre_process=self.pre_process,
            post_process=self.post_process, parallel_output=True,
            share_embeddings_and_output_weights=language.tie_word_embeddings and head.ties_embeddings,
            position_embedding_type=language.position_embedding_type, rotary_base=language.rotary_base)
        if language.rotary_embedding is not None:
            self.language_model.rotary_pos_emb = language.rotary_embedding()
        if self.post_process:
            head.install(self.language_model)
        self.output_rows = OutputRows(self.language_model)
        # megatron's finalize_model_grads reads these to all-reduce a tied embedding's gradient over PP stages
        self.share_embeddings_and_output_weights = self.language_model.share_embeddings_and_output_weights
        self._vision_names: Tuple[str, ...] = ()
        if self.pre_process:
            modules = vision.build()
            for name, module in modules.items():
                self.add_module(name, module)
            self._vision_names = tuple(modules)

    def shared_embedding_or_output_weight(self):
        """The tied embedding/output weight; megatron-core's finalize_model_grads all-reduces its gradient."""
        return self.language_model.shared_embedding_or_output_weight()

    def set_input_tensor(self, input_tensor) -> None:
        """The pipeline schedule hands the previous stage's activations here."""
        self.language_model.set_input_tensor(input_tensor)

    def freeze_vision(self, tower: bool, projector: bool) -> None:
        """Stop training the vision tower's and/or the projector's parameters (on the first stage; a no-op
        elsewhere)."""
        prefixes = (self.vision.tower_parameters if tower else ()) + (
            self.vision.projector_parameters if projector else ())
        for name, parameter in self.named_parameters():
            if any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes):
                parameter.requires_grad_(False)

    def forward(self, input_ids: torch.Tensor, position_ids: Optional[torch.Tensor] = None,
                packed_seq_params: Optional[PackedSeqParams] = None, pixel_values: Optional[torch.Tensor] = None,
                image_grid_thw: Optional[torch.Tensor] = None,
                prompt_mask: Optional[torch.Tensor] = None, output_rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        length = input_ids.shape[1]
        stream_length = self._stream_length(length)
        input_ids, packed_seq_params, prompt_mask = append_padding_sequence(
            input_ids, packed_seq_params, prompt_mask, stream_length)
        if self.language.position_embedding_type == "mrope":
            if packed_seq_params is not None:
                packed_seq_params = as_packed_segments(packed_seq_params).as_one_stream()
        else:
            position_ids = None
        decoder_input, block_kwargs = None, {}
        if self.pre_process:
            decoder_input, block_kwargs = self._embed(input_ids, pixel_values, image_grid_thw, prompt_mask)
        with self.output_rows.only(output_rows):
            output = self.language_model(input_ids, position_ids, attention_mask=None, decoder_input=decoder_input,
                                         packed_seq_params=packed_seq_params, extra_block_kwargs=block_kwargs)
        if not self.post_process:
            return output
        output = self.head.finish(output)
        if stream_length != length and output_rows is None:
            output = output[:, :length]
        return output

    def _embed(self, input_ids, pixel_values, image_grid_thw, prompt_mask):
        """([s(/TP), b, h] token embeddings with the image features at the image pads, decoder kwargs)."""
        embeddings = self.language_model.embedding(input_ids=input_ids, position_ids=None)
        pads = self._image_pads(input_ids, prompt_mask)
        if not input_ids.is_cuda:  # on a GPU, reading the count back would stall the stream in every forward
            self._check_image_pads(int(pads.sum()), image_grid_thw if pixel_values is not None else None)
        if pixel_values is None:
            return embeddings, {}
        modules = {name: getattr(self, name) for name in self._vision_names}
        features, block_kwargs = self.vision.encode(modules, pixel_values, image_grid_thw, pads)
        return self._place(embeddings, pads, features), block_kwargs

    def _image_pads(self, input_ids: torch.Tensor, prompt_mask: Optional[torch.Tensor]) -> torch.Tensor:
        """[b, s]: the positions whose embeddings image or video features replace."""
        pads = torch.zeros_like(input_ids, dtype=torch.bool)
        for token_id in self.vision.pad_token_ids:
            pads = pads | (input_ids == token_id)
        return pads if prompt_mask is None else pads & prompt_mask

    def _check_image_pads(self, count: int, image_grid_thw: Optional[torch.Tensor]) -> None:
        """One image pad per feature row of the images and videos given (none without pixel_values)."""
        unit = self.vision.patches_per_token
        expected = 0 if image_grid_thw is None else int(image_grid_thw.prod(-1).sum()) // unit
        if count != expected:
            raise ModelError(f"input_ids hold {count} image/video-pad tokens (ids {list(self.vision.pad_token_ids)}) "
                             f"but pixel_values/image_grid_thw describe {expected} image tokens; expand each pad to "
                             f"its image's grid_t*grid_h*grid_w/{unit} copies (and pass pixel_values with them)")

    def _place(self, embeddings: torch.Tensor, pads: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """`embeddings` [s(/TP), b, h] with features[i] at the i-th pad of `pads` [b, s] (batch-major order)."""
        if not self.config.sequence_parallel:
            return place_image_features(embeddings.transpose(0, 1), pads, features).transpose(0, 1).contiguous()
        # the embeddings are this rank's sequence chunk: place over the whole sequence, then take the same chunk
        batch, length = pads.shape
        whole = place_image_features(embeddings.new_zeros(batch, length, embeddings.shape[-1]), pads, features)
        chunk = tensor_parallel.scatter_to_sequence_parallel_region(whole.transpose(0, 1).contiguous())
        mask = pads.transpose(0, 1).unsqueeze(-1).chunk(self.dims.tensor, dim=0)[self.dims.tensor_rank]
        return torch.where(mask, chunk, embeddings)

    def _stream_length(self, length: int) -> int:
        """The packed length the decoder can take. megatron's all-gather token dispatcher (an MoE decoder's CPU
        path) gathers equal-sized chunks over the tensor-and-expert-parallel group, whose expert-parallel ranks
        may hold other data-parallel ranks' micro-batches: all take the group's longest. Sequence parallelism
        splits the stream over TP: a multiple of TP. Every pipeline stage computes the same."""
        config = self.config
        if config.num_moe_experts and config.moe_token_dispatcher_type == "allgather":
            group = self.dims.expert_tensor_and_expert_group
            if dist.get_world_size(group) > 1:
                device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
                longest = torch.tensor([length], device=device)
                dist.all_reduce(longest, op=dist.ReduceOp.MAX, group=group)
                length = int(longest.item())
        if config.sequence_parallel:
            length = -(-length // self.dims.tensor) * self.dims.tensor
        return length

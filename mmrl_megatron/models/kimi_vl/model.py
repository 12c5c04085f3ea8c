"""KimiVLModel: MoonViT + projector (first pipeline stage, replicated over TP) feeding the megatron-core
MLA/MoE language model, with the project's model forward contract."""
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel
from megatron.core.enums import ModelType
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.module import MegatronModule

from ..common.image_placement import place_image_features
from ..common.output_rows import OutputRows
from ..common.packing import append_padding_sequence
from ..errors import ModelError
from .hf_config import KimiVLConfig
from .language_model import build_language_model, language_transformer_config
from .vision import MoonViT, MultiModalProjector


class KimiVLModel(MegatronModule):
    """forward(input_ids [1, T], position_ids, packed_seq_params, pixel_values [patches, 3, p, p],
    image_grid_thw [images, 3] or [images, 2], prompt_mask [1, T], output_rows [R]) -> logits [1, T, vocab/TP]
    (with output_rows: [1, R, vocab/TP], those positions only; output_rows.py) on the last stage, else the
    hidden states for the pipeline schedule. position_ids are not used: MLA applies 1-D
    rotary per packed sequence itself, which is Kimi-VL's position scheme (no M-RoPE). prompt_mask (True
    on prompt tokens) limits media placeholders to prompts: a response may sample the placeholder id.

    Internally the packed stream may grow by one padding sequence (see _padded_length); its outputs
    are cut off again, so callers always see T positions."""

    def __init__(self, kimi: KimiVLConfig, transformer_config, pre_process: bool, post_process: bool):
        super().__init__(config=transformer_config)
        self.pre_process, self.post_process = pre_process, post_process
        self.model_type = ModelType.encoder_or_decoder  # read by megatron's pipeline schedules
        self.media_placeholder_token_id = kimi.media_placeholder_token_id
        self.language_model = build_language_model(kimi.text, transformer_config, pre_process, post_process)
        self.output_rows = OutputRows(self.language_model)
        # megatron's finalize_model_grads reads these to all-reduce a tied embedding's gradient over PP stages
        self.share_embeddings_and_output_weights = self.language_model.share_embeddings_and_output_weights
        if pre_process:
            # on the CPU they stay where they were built: the CPU, or the meta device for a streamed conversion
            place = dict(dtype=transformer_config.params_dtype,
                         device=torch.cuda.current_device() if torch.cuda.is_available() else None)
            self.vision_tower = MoonViT(kimi.vision).to(**place)
            self.multi_modal_projector = MultiModalProjector(kimi.vision, kimi.text.hidden_size).to(**place)

    def set_input_tensor(self, input_tensor) -> None:
        self.language_model.set_input_tensor(input_tensor)

    def shared_embedding_or_output_weight(self):
        return self.language_model.shared_embedding_or_output_weight()

    def image_features(self, pixel_values: torch.Tensor, image_grid: torch.Tensor) -> torch.Tensor:
        """[image tokens, text hidden], in image order."""
        return self.multi_modal_projector(self.vision_tower(pixel_values, image_grid))

    def _embed(self, input_ids, pixel_values, image_grid, prompt_mask) -> torch.Tensor:
        embeddings = self.language_model.embedding(input_ids=input_ids, position_ids=None)  # [s(/TP), b, h]
        placeholders = input_ids == self.media_placeholder_token_id
        if prompt_mask is not None:
            placeholders = placeholders & prompt_mask
        if pixel_values is None:
            if placeholders.any():
                raise ModelError(f"{int(placeholders.sum())} media placeholder tokens in the prompts but no "
                                 "pixel_values were given")
            return embeddings
        features = self.image_features(pixel_values, image_grid).to(embeddings.dtype)
        mask = placeholders.transpose(0, 1).unsqueeze(-1)  # [s, b, 1]
        if int(mask.sum()) != features.shape[0]:
            raise ModelError(f"{int(mask.sum())} media placeholder tokens (id {self.media_placeholder_token_id}) "
                             f"but {features.shape[0]} image features: expand each <|media_pad|> per image grid")
        hidden = embeddings.shape[-1]
        placed = place_image_features(torch.zeros(mask.shape[0], mask.shape[1], hidden, dtype=embeddings.dtype,
                                                  device=embeddings.device), mask.squeeze(-1), features)
        if self.config.sequence_parallel:  # embeddings are this rank's sequence chunk: take the same chunk
            placed = tensor_parallel.scatter_to_sequence_parallel_region(placed)
            mask = mask.chunk(self.config.tensor_model_parallel_size, dim=0)[
                parallel_state.get_tensor_model_parallel_rank()]
        return torch.where(mask, placed, embeddings)

    def _padded_length(self, length: int) -> int:
        """The packed length the MoE layers can take. megatron's all-gather token dispatcher (the CPU
        path) gathers equal-sized chunks over the tensor-and-expert-parallel group, whose expert-parallel
        ranks may hold other data-parallel ranks' micro-batches: all take the group's longest. Sequence
        parallelism splits the stream over TP: a multiple of TP. Every pipeline stage computes the same."""
        if self.config.moe_token_dispatcher_type == "allgather":
            group = parallel_state.get_expert_tensor_and_model_parallel_group()
            if dist.get_world_size(group) > 1:
                device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
                longest = torch.tensor([length], device=device)
                dist.all_reduce(longest, op=dist.ReduceOp.MAX, group=group)
                length = int(longest.item())
        if self.config.sequence_parallel:
            tensor = self.config.tensor_model_parallel_size
            length = -(-length // tensor) * tensor
        return length

    def forward(self, input_ids, position_ids=None, packed_seq_params: Optional[PackedSeqParams] = None,
                pixel_values=None, image_grid_thw=None, prompt_mask: Optional[torch.Tensor] = None,
                output_rows: Optional[torch.Tensor] = None):
        length = input_ids.shape[1]
        input_ids, packed_seq_params, prompt_mask = append_padding_sequence(
            input_ids, packed_seq_params, prompt_mask, self._padded_length(length))
        decoder_input = self._embed(input_ids, pixel_values, image_grid_thw, prompt_mask) if self.pre_process else None
        with self.output_rows.only(output_rows):
            output = self.language_model(input_ids=input_ids, position_ids=None, attention_mask=None,
                                         decoder_input=decoder_input, packed_seq_params=packed_seq_params)
        if not self.post_process or output_rows is not None:
            return output
        return output[:, :length]


def build_kimi_vl_model(kimi: KimiVLConfig, layout, params_dtype: torch.dtype = torch.float32,
                        bias_update_rate: float = 0.0, recompute: str = "none") -> KimiVLModel:
    """This pipeline stage's KimiVLModel; call after init_model_parallel(layout)."""
    config = language_transformer_config(kimi.text, layout, params_dtype, bias_update_rate, recompute=recompute)
    return KimiVLModel(kimi, config, pre_process=parallel_state.is_pipeline_first_stage(),
                       post_process=parallel_state.is_pipeline_last_stage())


def build_kimi_vl(model_config, kimi: KimiVLConfig, role: str) -> KimiVLModel:
    """FAMILY.build for model_type kimi_vl: roles "actor" and "reference" (logits).

    model_config is config.ModelConfig (dtype, recompute, freezing, moe_router_bias_update_rate); the
    layout is read from megatron's groups, so call after init_model_parallel."""
    from ...parallel import ParallelLayout

    if role == "critic":
        raise ModelError("Kimi-VL has no critic head yet: use a critic-free estimator (GRPO, RLOO, REINFORCE++)")
    layout = ParallelLayout(
        tensor=parallel_state.get_tensor_model_parallel_world_size(),
        pipeline=parallel_state.get_pipeline_model_parallel_world_size(),
        expert=parallel_state.get_expert_model_parallel_world_size(),
        expert_tensor=parallel_state.get_expert_tensor_parallel_world_size())
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[model_config.dtype]
    model = build_kimi_vl_model(kimi, layout, dtype,
                                model_config.moe_router_bias_update_rate, model_config.recompute)
    if model.pre_process:
        model.vision_tower.requires_grad_(not model_config.freeze_vision_tower)
        model.multi_modal_projector.requires_grad_(not model_config.freeze_merger)
    return model

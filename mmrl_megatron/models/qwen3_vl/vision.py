"""Qwen3-VL's vision tower as megatron-core modules (tensor-parallel attention, MLP and mergers).

Pixel rows -> patch embedding (a Conv3d with bias, as a matmul) + the learned position table resampled to
each image's grid -> blocks of 2-D-rotary full attention within each frame (LayerNorm, GELU MLP) -> the patch
merger (LayerNorm, merge**2 neighbours concatenated, GELU MLP) -> one embedding per merged patch, in the
image processor's order; plus, from each block in deepstack_visual_indexes, a DeepStack merger's features
(LayerNorm after the concatenation). Same numerics as transformers' Qwen3VLVisionModel.
"""
from typing import List, Tuple

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import build_module

from ..common.layer_list import ShardedLayerList
from ..common.packing import packed_segments
from ..common.patch_grid import frame_bounds, patch_positions
from ..common.transfer import to_device
from .geometry import VisionGeometry


class PatchMerger(MegatronModule):
    """norm -> merge**2 neighbours as one row -> column-parallel fc1 -> GELU -> row-parallel fc2.

    `after_shuffle`: the norm runs over the concatenated row (DeepStack mergers), else over each patch."""

    def __init__(self, config, vision: VisionGeometry, after_shuffle: bool) -> None:
        super().__init__(config=config)
        self.width = vision.hidden_size * vision.spatial_merge_size ** 2
        self.after_shuffle = after_shuffle
        self.norm = torch.nn.LayerNorm(self.width if after_shuffle else vision.hidden_size, eps=1e-6,
                                       dtype=config.params_dtype)
        self.linear_fc1 = tensor_parallel.ColumnParallelLinear(
            self.width, self.width, config=config, init_method=config.init_method, bias=True, gather_output=False)
        self.linear_fc2 = tensor_parallel.RowParallelLinear(
            self.width, vision.out_hidden_size, config=config, init_method=config.output_layer_init_method,
            bias=True, input_is_parallel=True, skip_bias_add=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        rows = self.norm(hidden.view(-1, self.width)) if self.after_shuffle else self.norm(hidden).view(-1, self.width)
        rows, _ = self.linear_fc1(rows)
        rows, _ = self.linear_fc2(F.gelu(rows))
        return rows


class PatchEmbed(torch.nn.Module):
    """A stride-equals-kernel Conv3d over one patch per row is a matmul; the weight keeps HF's 5-D shape."""

    def __init__(self, vision: VisionGeometry, dtype) -> None:
        super().__init__()
        shape = (vision.hidden_size, vision.in_channels, vision.temporal_patch_size, vision.patch_size,
                 vision.patch_size)
        self.weight = torch.nn.Parameter(torch.empty(shape, dtype=dtype))
        self.bias = torch.nn.Parameter(torch.zeros(vision.hidden_size, dtype=dtype))
        torch.nn.init.normal_(self.weight, std=0.02)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        weight = self.weight.view(self.weight.shape[0], -1)
        return F.linear(pixel_values.to(weight.dtype), weight, self.bias)


def resampled_positions(table: torch.Tensor, side: int, grid_thw: torch.Tensor, merge: int) -> torch.Tensor:
    """[N, hidden]: the square learned table [side*side, hidden] resampled bilinearly (corners aligned) to every
    image's h x w grid, in the processor's patch order, repeated over its frames. transformers gathers the same
    four-tap interpolation by index; F.interpolate computes it in one call per image."""
    grid = table.view(side, side, -1).permute(2, 0, 1)[None]
    pieces = []
    for frames, height, width in grid_thw.tolist():
        resized = F.interpolate(grid, size=(height, width), mode="bilinear", align_corners=True)[0]
        rows, columns = patch_positions(torch.tensor([[1, height, width]]), merge).unbind(-1)
        pieces.append(resized[:, rows, columns].t().repeat(frames, 1))
    return torch.cat(pieces)


class VisionModel(MegatronModule):
    """forward(pixel_values [N, C*T*P*P], image_grid_thw [images, 3]) ->
    (embeddings [N / merge**2, out_hidden_size], DeepStack features [k, N / merge**2, out_hidden_size])."""

    def __init__(self, config, vision: VisionGeometry, layer_spec) -> None:
        super().__init__(config=config)
        self.vision = vision
        self.patch_embed = PatchEmbed(vision, config.params_dtype)
        self.pos_embed = torch.nn.Embedding(vision.num_position_embeddings, vision.hidden_size,
                                            dtype=config.params_dtype)
        self.layers = ShardedLayerList(build_module(layer_spec, config=config, layer_number=index + 1)
                                       for index in range(vision.depth))
        self.merger = PatchMerger(config, vision, after_shuffle=False)
        self.deepstack_merger_list = torch.nn.ModuleList(
            PatchMerger(config, vision, after_shuffle=True) for _ in vision.deepstack_visual_indexes)
        quarter = vision.head_dim // 2
        self.register_buffer("inv_freq", 1.0 / vision.rope_theta ** (torch.arange(0, quarter, 2).float() / quarter),
                             persistent=False)

    def _rotary(self, grid_thw) -> torch.Tensor:
        """[N, 1, 1, head_dim] angles: first half rows, second half columns, then repeated (rotate_half form)."""
        positions = patch_positions(grid_thw, self.vision.spatial_merge_size)
        angles = (to_device(positions, self.inv_freq.device)[:, :, None].float() * self.inv_freq).flatten(1)
        return torch.cat([angles, angles], dim=-1)[:, None, None, :]

    def forward(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        vision, device = self.vision, pixel_values.device
        grid = image_grid_thw.cpu()  # host-side already in the trainer (MicroBatch keeps it there)
        positions = resampled_positions(self.pos_embed.weight, vision.position_grid_side, grid,
                                        vision.spatial_merge_size)
        hidden = (self.patch_embed(pixel_values) + positions.to(pixel_values.device)).unsqueeze(1)
        rotary = self._rotary(grid)
        frames = packed_segments(frame_bounds(grid), device, qkv_format="sbhd")  # one [N, 1] stream
        deepstack: List[torch.Tensor] = []
        indexes = list(vision.deepstack_visual_indexes)
        for index, layer in enumerate(self.layers):
            hidden, _ = layer(hidden, attention_mask=None, rotary_pos_emb=rotary, packed_seq_params=frames)
            if index in indexes:
                deepstack.append(self.deepstack_merger_list[indexes.index(index)](hidden.squeeze(1)))
        merged = self.merger(hidden.squeeze(1))
        features = torch.stack(deepstack) if deepstack else merged.new_zeros(0, *merged.shape)
        return merged, features

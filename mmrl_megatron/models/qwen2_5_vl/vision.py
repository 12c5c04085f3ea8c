"""Qwen2.5-VL's vision tower as megatron-core modules (tensor-parallel attention, MLP and merger).

Pixel rows -> patch embedding -> blocks of 2-D-rotary attention (windowed, except the blocks listed in
fullatt_block_indexes, which see the whole image) -> patch merger (RMSNorm, 2x2 patches concatenated,
GELU MLP) -> one embedding per merged patch, in the image-processor's order. Same numerics as
transformers' Qwen2_5_VisionTransformerPretrainedModel; the index helpers here and in common/patch_grid.py are ours
because transformers moves them between releases (5.x's vision_utils is absent from the 5.17 on the GPU machine).
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
from .hf_config import VisionShape


def window_order(grid_thw: torch.Tensor, merge: int, window_merged: int) -> Tuple[torch.Tensor, List[int]]:
    """(permutation of merged patches into window order, window boundaries in patches).

    Each frame is cut into window_merged x window_merged tiles of merged patches (ragged at the
    bottom/right edges); the boundaries count patches (merge**2 per merged patch)."""
    order, bounds, offset = [], [0], 0
    unit = merge * merge
    for frames, height, width in grid_thw.tolist():
        rows, columns = height // merge, width // merge
        index = torch.arange(frames * rows * columns).reshape(frames, rows, columns)
        for frame in range(frames):
            for top in range(0, rows, window_merged):
                for left in range(0, columns, window_merged):
                    tile = index[frame, top:top + window_merged, left:left + window_merged].flatten()
                    order.append(tile + offset)
                    bounds.append(bounds[-1] + tile.numel() * unit)
        offset += frames * rows * columns
    return torch.cat(order), bounds


class PatchMerger(MegatronModule):
    """ln_q -> view merge**2 neighbours as one row -> column-parallel fc1 -> GELU -> row-parallel fc2."""

    def __init__(self, config, shape: VisionShape) -> None:
        super().__init__(config=config)
        width = shape.hidden_size * shape.spatial_merge_size ** 2
        self.width = width
        self.ln_q = torch.nn.RMSNorm(shape.hidden_size, eps=1e-6, dtype=config.params_dtype)
        self.linear_fc1 = tensor_parallel.ColumnParallelLinear(
            width, width, config=config, init_method=config.init_method, bias=True, gather_output=False)
        self.linear_fc2 = tensor_parallel.RowParallelLinear(
            width, shape.out_hidden_size, config=config, init_method=config.output_layer_init_method, bias=True,
            input_is_parallel=True, skip_bias_add=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden, _ = self.linear_fc1(self.ln_q(hidden).view(-1, self.width))
        hidden, _ = self.linear_fc2(F.gelu(hidden))
        return hidden


class VisionModel(MegatronModule):
    """forward(pixel_values [N, C*T*P*P], image_grid_thw [images, 3]) -> [N / merge**2, out_hidden_size]."""

    def __init__(self, config, shape: VisionShape, layer_spec) -> None:
        super().__init__(config=config)
        self.shape = shape
        patch = (shape.hidden_size, shape.in_channels, shape.temporal_patch_size, shape.patch_size, shape.patch_size)
        # A stride-equals-kernel Conv3d over one patch per row is a matmul; the weight keeps HF's 5-D shape.
        self.patch_embed = torch.nn.Parameter(torch.empty(patch, dtype=config.params_dtype))
        torch.nn.init.normal_(self.patch_embed, std=0.02)
        self.layers = ShardedLayerList(build_module(layer_spec, config=config, layer_number=index + 1)
                                       for index in range(shape.depth))
        self.merger = PatchMerger(config, shape)
        quarter = shape.head_dim // 2
        self.register_buffer("inv_freq", 1.0 / shape.rope_theta ** (torch.arange(0, quarter, 2).float() / quarter),
                             persistent=False)

    def _rotary(self, grid_thw, order_of_patches) -> torch.Tensor:
        """[N, 1, 1, head_dim] angles: first half rows, second half columns, then repeated (rotate_half form)."""
        positions = patch_positions(grid_thw, self.shape.spatial_merge_size)[order_of_patches]
        angles = (to_device(positions, self.inv_freq.device)[:, :, None].float() * self.inv_freq).flatten(1)
        return torch.cat([angles, angles], dim=-1)[:, None, None, :]

    def forward(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> torch.Tensor:
        shape, device = self.shape, pixel_values.device
        unit = shape.spatial_merge_size ** 2
        grid = image_grid_thw.cpu()  # host-side already in the trainer (MicroBatch keeps it there)
        merged_order, window_bounds = window_order(
            grid, shape.spatial_merge_size, shape.window_size // shape.spatial_merge_size // shape.patch_size)
        patch_order = (merged_order[:, None] * unit + torch.arange(unit)).flatten()
        weight = self.patch_embed.view(shape.hidden_size, -1)
        hidden = F.linear(pixel_values.to(weight.dtype), weight)[to_device(patch_order, device)].unsqueeze(1)
        rotary = self._rotary(grid, patch_order)
        # windows and frames are packed sequences of one [N, 1] stream: one attention kernel per layer
        full = packed_segments(frame_bounds(grid), device, qkv_format="sbhd")
        windowed = packed_segments(window_bounds, device, qkv_format="sbhd")
        for index, layer in enumerate(self.layers):
            params = full if index in shape.fullatt_block_indexes else windowed
            hidden, _ = layer(hidden, attention_mask=None, rotary_pos_emb=rotary, packed_seq_params=params)
        merged = self.merger(hidden.squeeze(1))
        return merged[to_device(torch.argsort(merged_order), device)]

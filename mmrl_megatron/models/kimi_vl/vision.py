"""MoonViT (Kimi-VL's vision tower) and its projector, as plain torch modules under the published names.

Written from the published remote code's description (moonshotai/Kimi-VL-A3B-*: modeling_kimi_vl.py, as
ported by SGLang and vLLM): a 14x14 patch Conv2d plus a learned 2-D position table bicubically
resampled to each image's patch grid; 2-D rotary on interleaved channel pairs (even pairs rotate by the
column, odd pairs by the row); full attention within each image at its native resolution; a 2x2 merge
of neighbouring patches; the projector LayerNorm -> Linear -> GELU -> Linear into the text width.
The tower is replicated over tensor-parallel ranks (as Megatron-Bridge does for K2.5-VL): at 0.4 B
parameters it is small next to the 16 B language model, and every rank then sees identical features.
Module and parameter names equal the checkpoint's (`vision_tower.*`, `multi_modal_projector.*`).
"""
from typing import List

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelError
from .hf_config import MoonViTConfig

ROPE_THETA = 10000.0


def image_grids(image_grid: torch.Tensor) -> List[tuple]:
    """Per-image (rows, cols) in patches from Kimi-VL's [N, 2] grid_hws or a [N, 3] (t=1, h, w) grid."""
    grid = image_grid.tolist()
    return [(int(row[-2]), int(row[-1])) for row in grid]


class InterpolatedPositionTable(nn.Module):
    """A learned [H0, W0, D] table, bicubically resampled to each image's (h, w) and added per patch."""

    def __init__(self, height: int, width: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(height, width, dim))
        nn.init.normal_(self.weight)

    def forward(self, patches: torch.Tensor, grids: List[tuple]) -> torch.Tensor:
        tables = []
        for rows, cols in grids:
            if (rows, cols) == tuple(self.weight.shape[:2]):
                tables.append(self.weight.flatten(0, 1))
                continue
            resized = F.interpolate(self.weight.permute(2, 0, 1).unsqueeze(0), size=(rows, cols), mode="bicubic")
            tables.append(resized.squeeze(0).permute(1, 2, 0).flatten(0, 1))
        return patches + torch.cat(tables)


class PatchEmbed(nn.Module):
    def __init__(self, config: MoonViTConfig):
        super().__init__()
        self.proj = nn.Conv2d(3, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size)
        self.pos_emb = InterpolatedPositionTable(config.init_pos_emb_height, config.init_pos_emb_width,
                                                 config.hidden_size)

    def forward(self, pixel_values: torch.Tensor, grids: List[tuple]) -> torch.Tensor:
        """pixel_values [patches, 3, p, p] (row-major per image) -> [patches, hidden]."""
        patches = self.proj(pixel_values.to(self.proj.weight.dtype)).flatten(1)
        return self.pos_emb(patches, grids)


def rotary_angles(grids: List[tuple], head_dim: int, device) -> torch.Tensor:
    """[patches, head_dim/2] angles: pair 2k turns by column*f_k, pair 2k+1 by row*f_k, f_k = theta^(-4k/head_dim)."""
    freqs = 1.0 / ROPE_THETA ** (torch.arange(0, head_dim, 4, device=device)[: head_dim // 4].float() / head_dim)
    angles = []
    for rows, cols in grids:
        flat = torch.arange(rows * cols, device=device).float()
        col_angles = torch.outer(flat % cols, freqs)
        row_angles = torch.outer(torch.div(flat, cols, rounding_mode="floor"), freqs)
        angles.append(torch.stack([col_angles, row_angles], dim=-1).flatten(1))
    return torch.cat(angles)


def apply_interleaved_rotary(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (2i, 2i+1) of x [patches, heads, head_dim] by angles [patches, head_dim/2], in fp32."""
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    rotation = torch.polar(torch.ones_like(angles), angles).unsqueeze(1)
    return torch.view_as_real(pairs * rotation).flatten(-2).to(x.dtype)


class EncoderMLP(nn.Module):
    def __init__(self, config: MoonViTConfig):
        super().__init__()
        self.fc0 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc1 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x):
        return self.fc1(F.gelu(self.fc0(x), approximate="tanh"))


class EncoderLayer(nn.Module):
    def __init__(self, config: MoonViTConfig):
        super().__init__()
        self.heads = config.num_attention_heads
        self.norm0 = nn.LayerNorm(config.hidden_size)
        self.norm1 = nn.LayerNorm(config.hidden_size)
        self.wqkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.wo = nn.Linear(config.hidden_size, config.hidden_size)
        self.mlp = EncoderMLP(config)

    def attention(self, x: torch.Tensor, angles: torch.Tensor, lengths: List[int]) -> torch.Tensor:
        qkv = self.wqkv(x).view(x.shape[0], 3, self.heads, -1)
        query, key, value = qkv.unbind(1)
        query, key = apply_interleaved_rotary(query, angles), apply_interleaved_rotary(key, angles)
        outputs = []
        for q, k, v in zip(query.split(lengths), key.split(lengths), value.split(lengths)):
            # every patch sees every patch of its own image, none of another's
            out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1))
            outputs.append(out.transpose(0, 1).flatten(1))
        return self.wo(torch.cat(outputs))

    def forward(self, x, angles, lengths):
        x = x + self.attention(self.norm0(x), angles, lengths)
        return x + self.mlp(self.norm1(x))


class Encoder(nn.Module):
    def __init__(self, config: MoonViTConfig):
        super().__init__()
        self.blocks = nn.ModuleList(EncoderLayer(config) for _ in range(config.num_hidden_layers))
        self.final_layernorm = nn.LayerNorm(config.hidden_size)

    def forward(self, x, angles, lengths):
        for block in self.blocks:
            x = block(x, angles, lengths)
        return self.final_layernorm(x)


class MoonViT(nn.Module):
    """pixel_values [patches, 3, p, p] + grids -> merged features [tokens, merge_h*merge_w, hidden]."""

    def __init__(self, config: MoonViTConfig):
        super().__init__()
        self.config = config
        self.patch_embed = PatchEmbed(config)
        self.encoder = Encoder(config)

    def forward(self, pixel_values: torch.Tensor, image_grid: torch.Tensor) -> torch.Tensor:
        check_image_grid(image_grid, self.config)
        grids = image_grids(image_grid)
        x = self.patch_embed(pixel_values, grids)
        angles = rotary_angles(grids, self.config.head_dim, x.device)
        x = self.encoder(x, angles, [rows * cols for rows, cols in grids])
        return merge_patches(x, grids, self.config.merge_kernel_size)


def merge_patches(x: torch.Tensor, grids: List[tuple], kernel: tuple) -> torch.Tensor:
    """Group each image's kernel-sized neighbourhoods: [patches, D] -> [patches/k, k, D], row-major blocks."""
    kernel_rows, kernel_cols = kernel
    merged = []
    for image, (rows, cols) in zip(x.split([r * c for r, c in grids]), grids):
        blocks = image.view(rows // kernel_rows, kernel_rows, cols // kernel_cols, kernel_cols, -1)
        merged.append(blocks.permute(0, 2, 1, 3, 4).reshape(-1, kernel_rows * kernel_cols, x.shape[-1]))
    return torch.cat(merged)


class MultiModalProjector(nn.Module):
    """[tokens, k, D] merged patches -> [tokens, text_hidden]."""

    def __init__(self, config: MoonViTConfig, text_hidden_size: int):
        super().__init__()
        kernel = config.merge_kernel_size[0] * config.merge_kernel_size[1]
        self.pre_norm = nn.LayerNorm(config.hidden_size)
        self.linear_1 = nn.Linear(kernel * config.hidden_size, kernel * config.hidden_size)
        self.linear_2 = nn.Linear(kernel * config.hidden_size, text_hidden_size)

    def forward(self, merged: torch.Tensor) -> torch.Tensor:
        x = self.pre_norm(merged).flatten(1)
        return self.linear_2(F.gelu(self.linear_1(x)))


def check_image_grid(image_grid: torch.Tensor, config: MoonViTConfig) -> None:
    """Every image's patch grid must tile into merge kernels; the processor pads images to guarantee it."""
    for index, (rows, cols) in enumerate(image_grids(image_grid)):
        if rows % config.merge_kernel_size[0] or cols % config.merge_kernel_size[1]:
            raise ModelError(f"image {index}: patch grid {rows}x{cols} is not a multiple of the merge kernel "
                             f"{tuple(config.merge_kernel_size)}; pad images as Kimi-VL's processor does")

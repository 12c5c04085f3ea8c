"""Index helpers over a Qwen-style image_grid_thw ([images, 3]: frames, patch rows, patch columns) that both
Qwen vision towers use. Ours rather than transformers' because transformers moves them between releases."""
from typing import List

import torch


def patch_positions(grid_thw: torch.Tensor, merge: int) -> torch.Tensor:
    """LongTensor[N, 2] (row, column) of every patch, in the processor's order (merge blocks contiguous)."""
    positions = []
    for frames, height, width in grid_thw.tolist():
        rows, columns = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
        blocks = (height // merge, merge, width // merge, merge)
        rows = rows.reshape(blocks).transpose(1, 2).flatten()
        columns = columns.reshape(blocks).transpose(1, 2).flatten()
        positions.append(torch.stack([rows, columns], dim=-1).repeat(frames, 1))
    return torch.cat(positions)


def frame_bounds(grid_thw: torch.Tensor) -> List[int]:
    """Boundaries (in patches) of every frame: full attention never crosses a frame."""
    bounds = [0]
    for frames, height, width in grid_thw.tolist():
        start = bounds[-1]
        bounds.extend(start + height * width * (k + 1) for k in range(frames))
    return bounds

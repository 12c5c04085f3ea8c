"""Shared fixtures for the embedded-engine tests: tiny checkpoint, mixed image/text requests, an HF scorer."""
import inspect
from typing import List, Optional, Sequence

import torch

from mmrl_megatron.rollout import RolloutRequest, RolloutResult


def make_requests(config, grids: Sequence[Optional[List[int]]], text_len: int = 5, seed: int = 0) -> List[RolloutRequest]:
    """One request per grid: a chat-like prefix, the expanded image pads (grid None: text only), random text."""
    generator = torch.Generator().manual_seed(seed)
    merge = config.vision_config.spatial_merge_size
    requests = []
    for grid in grids:
        text = torch.randint(0, 256, (text_len,), generator=generator).tolist()
        if grid is None:
            requests.append(RolloutRequest([10, 20, 30] + text))
            continue
        patches = grid[0] * grid[1] * grid[2]
        pads = [config.vision_start_token_id] + [config.image_token_id] * (patches // merge ** 2) + [config.vision_end_token_id]
        pixel_values = torch.randn(patches, 3 * config.vision_config.temporal_patch_size * config.vision_config.patch_size ** 2,
                                   generator=generator)
        requests.append(RolloutRequest([10, 20, 30] + pads + text, pixel_values, torch.tensor([grid])))
    return requests


def hf_logits(model, request: RolloutRequest, response_ids: List[int]) -> torch.Tensor:
    """HF's own forward over prompt + response: fp32 logits predicting each response token [R, vocab]."""
    input_ids = torch.tensor([list(request.prompt_ids) + list(response_ids)], device=model.device)
    inputs = {} if request.pixel_values is None else dict(pixel_values=request.pixel_values,
                                                          image_grid_thw=request.image_grid_thw)
    # transformers >= 5.2x derives M-RoPE positions from mm_token_type_ids; earlier releases from the ids.
    if "mm_token_type_ids" in inspect.signature(model.model.get_rope_index).parameters:
        inputs["mm_token_type_ids"] = (input_ids == model.config.image_token_id).int()
    with torch.no_grad():
        logits = model(input_ids=input_ids, **inputs).logits[0].float()
    prompt_len = len(request.prompt_ids)
    return logits[prompt_len - 1:-1]


def hf_logprobs(model, request: RolloutRequest, result: RolloutResult, temperature: float) -> torch.Tensor:
    logits = hf_logits(model, request, result.response_ids)
    scaled = logits / (temperature if temperature > 0 else 1.0)
    tokens = torch.tensor(result.response_ids, device=logits.device)[:, None]
    return torch.log_softmax(scaled, -1).gather(-1, tokens)[:, 0]

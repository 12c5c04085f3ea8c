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


def make_video_request(config, video_grid: List[int], image_grid: List[int], second_per_grid_t: float,
                       seed: int = 0) -> RolloutRequest:
    """A prompt holding a video then an image (expanded pads, random patches) with its second_per_grid_ts."""
    generator = torch.Generator().manual_seed(seed)
    merge = config.vision_config.spatial_merge_size
    ids = [10, 20, 30]
    for pad, (t, h, w) in ((config.video_token_id, video_grid), (config.image_token_id, image_grid)):
        ids += [config.vision_start_token_id] + [pad] * (t * h * w // merge ** 2) + [config.vision_end_token_id, 40]
    grid = torch.tensor([video_grid, image_grid])
    row = 3 * config.vision_config.temporal_patch_size * config.vision_config.patch_size ** 2
    pixel_values = torch.randn(int(grid.prod(-1).sum()), row, generator=generator)
    return RolloutRequest(ids, pixel_values, grid, second_per_grid_ts=[second_per_grid_t])


def _hf_vision_inputs(model, request: RolloutRequest, sequence: List[int], given: List[bool]) -> dict:
    """transformers' image and video inputs for a request whose rows are images or videos in the order of
    their spans in `sequence` (the prompt, or a whole multi-turn conversation whose environment turns bring
    images), told apart by the pad after each vision start. Only tokens the model was given (`given`, per
    token of sequence) open spans: a sampled token may carry the vision-start id as ordinary text."""
    if request.pixel_values is None:
        return {}
    ids = torch.tensor(sequence)
    starts = (ids[:-1] == model.config.vision_start_token_id) & torch.tensor(given[:-1])
    pads = ids[1:][starts]
    is_video = pads == model.config.video_token_id
    patches = request.pixel_values.split(request.image_grid_thw.prod(-1).tolist())
    inputs = {}
    for name, rows in (("image", ~is_video), ("video", is_video)):
        if rows.any():
            chosen = [piece for piece, keep in zip(patches, rows.tolist()) if keep]
            inputs["pixel_values" if name == "image" else "pixel_values_videos"] = torch.cat(chosen)
            inputs[f"{name}_grid_thw"] = request.image_grid_thw[rows]
    if request.second_per_grid_ts:
        inputs["second_per_grid_ts"] = torch.tensor(request.second_per_grid_ts)
    return inputs


def hf_logits(model, request: RolloutRequest, response_ids: List[int],
              given: Optional[List[bool]] = None) -> torch.Tensor:
    """HF's own forward over prompt + response: fp32 logits predicting each response token [R, vocab].
    `given` marks response tokens the model was given (a multi-turn conversation's environment turns)."""
    input_ids = torch.tensor([list(request.prompt_ids) + list(response_ids)], device=model.device)
    given_mask = [True] * len(request.prompt_ids) + list(given or [False] * len(response_ids))
    inputs = _hf_vision_inputs(model, request, input_ids[0].tolist(), given_mask)
    # transformers >= 5.2x derives M-RoPE positions from mm_token_type_ids; earlier releases from the ids.
    # Only pads the model was given are images' or videos': generated tokens are text whatever their ids.
    if "mm_token_type_ids" in inspect.signature(model.model.get_rope_index).parameters:
        given_tokens = torch.tensor(given_mask, device=model.device)[None]
        inputs["mm_token_type_ids"] = ((input_ids == model.config.image_token_id).int()
                                       + 2 * (input_ids == model.config.video_token_id).int()) * given_tokens
    with torch.no_grad():
        logits = model(input_ids=input_ids, **inputs).logits[0].float()
    prompt_len = len(request.prompt_ids)
    return logits[prompt_len - 1:-1]


def hf_logprobs(model, request: RolloutRequest, result: RolloutResult, temperature: float,
                given: Optional[List[bool]] = None) -> torch.Tensor:
    logits = hf_logits(model, request, result.response_ids, given)
    scaled = logits / (temperature if temperature > 0 else 1.0)
    tokens = torch.tensor(result.response_ids, device=logits.device)[:, None]
    return torch.log_softmax(scaled, -1).gather(-1, tokens)[:, 0]

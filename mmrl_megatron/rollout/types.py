"""What goes into and comes out of any rollout engine (embedded or SGLang)."""
from dataclasses import dataclass, field
from typing import Any, List, Optional

import torch


@dataclass
class SamplingParams:
    n: int = 1  # independent samples per request
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = -1  # -1: off
    max_new_tokens: int = 64
    stop_token_ids: List[int] = field(default_factory=list)  # generation ends after emitting one
    stop: List[str] = field(default_factory=list)  # stop strings, matched on decoded text
    ignore_eos: bool = False  # True: the model's end-of-sequence ids do not stop generation (benchmarks)
    seed: Optional[int] = None


@dataclass
class RolloutRequest:
    """One prompt. `prompt_ids` has the chat template applied and image pads already expanded."""

    prompt_ids: List[int]
    pixel_values: Optional[torch.Tensor] = None  # [patches, channels * temporal * patch * patch], images and videos
    image_grid_thw: Optional[torch.Tensor] = None  # [images + videos, 3], in prompt order
    images: List[bytes] = field(default_factory=list)  # the encoded images, for engines that process them
    prompt_text: Optional[str] = None  # templated text with one pad per image, for engines that take text
    second_per_grid_ts: List[float] = field(default_factory=list)  # per video, in prompt order (M-RoPE time)
    max_new_tokens: Optional[int] = None  # this request's response budget; None: SamplingParams.max_new_tokens


@dataclass
class RolloutResult:
    request_index: int
    sample_index: int  # 0..n-1 within the request
    response_ids: List[int]
    logprobs: List[float]  # per response token, under the sampling temperature
    finish_reason: str  # "stop" | "length" | "abort"
    # None from an engine (one assistant turn); a multi-turn rollout's TurnRecord (multi_turn.py) says which
    # response tokens the environment wrote (their log-probs are 0) and carries its images
    turns: Optional[Any] = None

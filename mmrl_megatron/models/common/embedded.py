"""What a family hands the embedded rollout engine (rollout/embedded/): an EmbeddedModel, built from a
checkpoint directory by the family's `embedded_engine` (models/<family>/embedded.py).

The engine and its decode loop never look at a family's modules. A family's differences (module tree,
checkpoint names, prompt positions, what the KV cache holds) live in its adapter; the prompt checks here
make every family report a malformed request the same way (ModelError, which the engine reports as a
RolloutError). A request is anything with the RolloutRequest fields the adapters read (prompt_ids,
pixel_values, image_grid_thw, second_per_grid_ts).
"""
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch

from ..errors import ModelError
from .cached_decoder import CachedDecoder

WeightLookup = Callable[[str], Optional[torch.Tensor]]  # checkpoint name -> engine tensor (or view), None: unknown


@dataclass
class PreparedPrompt:
    request_index: int
    input_ids: torch.Tensor  # [L] long, CPU
    positions: torch.Tensor  # [position rows, L] rotary positions (3 rows for M-RoPE), CPU
    rope_delta: int  # next position = next index + rope_delta
    pixel_values: Optional[torch.Tensor]
    image_grid_thw: Optional[torch.Tensor]

    @property
    def length(self) -> int:
        return int(self.input_ids.numel())


@dataclass
class EmbeddedModel:
    module: torch.nn.Module  # every weight, in eval mode without gradients; moved whole by release/resume
    decoder: CachedDecoder
    prepare_prompt: Callable[[object, int], PreparedPrompt]  # (request, index); ModelError if malformed
    weight: WeightLookup  # resolved at each call, so offloading (which swaps storage) leaves nothing stale
    end_of_sequence_ids: List[int]  # config.json's (the engine adds generation_config.json's)
    pixel_dtype: torch.dtype
    cuda_graphs: bool  # whether the decode step may be captured (no data-dependent shapes or host syncs)


def eos_ids(value) -> List[int]:
    """A config's eos_token_id (an int, a list, or None) as a list."""
    return [value] if isinstance(value, int) else list(value or [])


def prompt_ids(request, request_index: int) -> torch.Tensor:
    """The request's prompt ids as a 1-D long tensor; raises ModelError for an empty prompt."""
    input_ids = torch.as_tensor(request.prompt_ids, dtype=torch.long).flatten()
    if input_ids.numel() == 0:
        raise ModelError(f"request {request_index} has an empty prompt_ids")
    return input_ids


def check_image_placeholders(request, request_index: int, found: int, expected: int,
                             placeholder: str, expansion: str) -> None:
    """Raise ModelError unless the prompt holds exactly the `expected` placeholder tokens its images need
    (and images come with pixel_values exactly when it holds any); `expansion` says how to expand them."""
    if found != expected or (expected > 0) != (request.pixel_values is not None):
        raise ModelError(f"request {request_index} has {found} {placeholder} tokens but its image_grid_thw implies "
                         f"{expected} (pixel_values given: {request.pixel_values is not None}): {expansion}")


def skip_weight_initialisation():
    """transformers' context that builds modules without initialising their weights (every weight
    arrives through update_weights); buffers computed in __init__ (rotary frequencies) are still built."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers releases before initialization.py kept it in modeling_utils
        from transformers.modeling_utils import no_init_weights
    return no_init_weights()

"""Why a sequence ends: finish reasons, stop tokens (kept in the response) and stop strings."""
from typing import Callable, List, Optional, Sequence

import torch

STOP = "stop"
LENGTH = "length"


class StopRules:
    """Stop ids are checked on the device for the whole batch; stop strings on the host, per sequence,
    by decoding only the response's tail (enough tokens to hold the longest stop string)."""

    def __init__(self, stop_token_ids: Sequence[int], stop_strings: Sequence[str], device: torch.device,
                 decode: Optional[Callable[[List[int]], str]]) -> None:
        self.stop_ids = torch.tensor(sorted(set(stop_token_ids)), dtype=torch.long, device=device)
        self.stop_strings = list(stop_strings)
        self._decode = decode
        # Every token covers at least one byte, so a stop string ending in the last token lies within
        # its byte length + 1 tokens (one more for a token that only starts inside the string).
        self._tail_tokens = max((len(text.encode("utf-8")) for text in self.stop_strings), default=0) + 2

    @property
    def uses_strings(self) -> bool:
        return bool(self.stop_strings)

    def token_stops(self, tokens: torch.Tensor) -> torch.Tensor:
        """Bool per sampled token: it is a stop token."""
        if self.stop_ids.numel() == 0:
            return torch.zeros_like(tokens, dtype=torch.bool)
        return torch.isin(tokens, self.stop_ids)

    def string_stops(self, response_ids: List[int]) -> bool:
        """Whether the response text now contains a stop string (checked after every new token)."""
        tail = self._decode(response_ids[-self._tail_tokens:])
        return any(text in tail for text in self.stop_strings)

"""The critic's scalar head, shaped to stand in for GPTModel's output layer."""
import torch
from megatron.core.transformer.module import MegatronModule


class ValueHead(MegatronModule):
    """hidden [s, b, h] -> values [s, b, 1]; replicated over TP (one output column cannot be split).

    Takes the output layer's call signature (weight=, runtime_gather_output=) so GPTModel's
    post-processing runs unchanged. Zero-initialised: a fresh critic predicts 0 for every token."""

    def __init__(self, config) -> None:
        super().__init__(config=config)
        self.weight = torch.nn.Parameter(torch.zeros(1, config.hidden_size, dtype=config.params_dtype))
        self.bias = torch.nn.Parameter(torch.zeros(1, dtype=config.params_dtype))

    def forward(self, hidden: torch.Tensor, weight=None, runtime_gather_output=None):
        return torch.nn.functional.linear(hidden, self.weight, self.bias), None

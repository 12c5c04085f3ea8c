"""The last pipeline stage's head, chosen by role: the vocabulary projection for the actor and reference,
a scalar value head for the critic (vlm.VisionLanguageModel installs and applies it).

A head has `ties_embeddings` (may the output layer share the embedding's weight), `install(language_model)`
(put its module on a last-stage GPTModel) and `finish(output)` (the GPTModel's output -> the stage's output).
"""
import torch
from megatron.core.transformer.module import MegatronModule

from ..errors import ModelError


def padded_vocab_size(vocab_size: int, divisible_by: int, tensor_parallel: int) -> int:
    """Megatron's rule: round the vocabulary up to a multiple of divisible_by * TP."""
    multiple = divisible_by * tensor_parallel
    return -(-vocab_size // multiple) * multiple


class LogitsHead:
    """GPTModel's own (TP-sharded) output layer: logits [b, s, padded_vocab / TP] with the columns at and past
    `vocab_size` at -inf, since they only pad the vocabulary to a TP multiple and are not tokens. `tensor_rank`
    says which vocabulary shard this rank's columns are."""

    ties_embeddings = True

    def __init__(self, vocab_size: int, tensor_rank: int) -> None:
        self.vocab_size, self.tensor_rank = vocab_size, tensor_rank

    def install(self, language_model) -> None:
        """Nothing to add: the output layer is the projection."""

    def finish(self, logits: torch.Tensor) -> torch.Tensor:
        shard = logits.shape[-1]
        real = self.vocab_size - self.tensor_rank * shard
        if real >= shard:
            return logits
        return logits.masked_fill(torch.arange(shard, device=logits.device) >= real, float("-inf"))


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


class CriticHead:
    """A ValueHead in the output layer's place, never tied to the embedding: values [b, s]."""

    ties_embeddings = False

    def install(self, language_model) -> None:
        language_model.output_layer = ValueHead(language_model.config)

    def finish(self, values: torch.Tensor) -> torch.Tensor:
        return values.squeeze(-1)


def head_for_role(role: str, vocab_size: int, dims):
    """The head of `role` ("actor", "reference": logits over `vocab_size` tokens split over the started
    parallel.ParallelDims `dims`' tensor ranks; "critic": values)."""
    if role == "critic":
        return CriticHead()
    if role in ("actor", "reference"):
        return LogitsHead(vocab_size, dims.tensor_rank)
    raise ModelError(f"role must be actor, reference or critic, got {role!r}")

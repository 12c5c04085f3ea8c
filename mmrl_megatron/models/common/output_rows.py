"""Project only the positions whose predictions are used onto the vocabulary.

Scoring and training read next-token log-probs at the response positions only; an image prompt is about
half of a packed stream. megatron-core's GPTModel sends every position through its output layer, so the
[T, V] logits GEMM and the log-softmax passes over them (a 152k-wide vocabulary) ran for prompt tokens too.
`OutputRows` puts a forward pre-hook on the output layer that keeps only the chosen rows of its input, so a
forward with rows returns [b, R, V] (or the critic's [b, R] values) in the rows' order. Under sequence
parallelism the layer's input is this rank's sequence chunk: the hook gathers the sequence first and lets
the layer skip its own gather, as megatron-core does for its last-token inference logits; the layer then
all-reduces its input gradient itself, so the gather's backward only takes this rank's chunk.
"""
import contextlib
from typing import Optional

import torch


class OutputRows:
    """Built on a GPTModel (a stage without an output layer gets no hooks; `only` is then a no-op)."""

    def __init__(self, language_model) -> None:
        self._rows: Optional[torch.Tensor] = None
        self._gathered_sequence = False
        layer = getattr(language_model, "output_layer", None)
        if layer is not None:
            layer.register_forward_pre_hook(self._select)
            layer.register_forward_hook(self._restore)

    @contextlib.contextmanager
    def only(self, rows: Optional[torch.Tensor]):
        """Within the block the output layer sees stream rows `rows` ([R] on the device; None: all)."""
        self._rows = rows
        try:
            yield
        finally:
            self._rows = None

    def _select(self, layer, args):
        if self._rows is None:
            return None
        hidden = args[0]  # [s, b, h]
        if getattr(layer, "sequence_parallel", False):
            from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

            hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False)
            layer.sequence_parallel = False
            self._gathered_sequence = True
        return (hidden.index_select(0, self._rows), *args[1:])

    def _restore(self, layer, args, output):
        if self._gathered_sequence:
            layer.sequence_parallel = True
            self._gathered_sequence = False
        return None

"""DeepStack: vision features added to the language model's hidden states after its first layers.

Qwen3-VL's vision tower hands the language model, besides the embeddings that replace the image pads, one
feature row per image token from each of its `deepstack_visual_indexes` blocks; the k-th is added at the
image tokens to the output of decoder layer k (transformers' Qwen3VLTextModel._deepstack_process).

The features travel to the layers as the decoder's cross-attention `context` (our layers have no cross
attention, so megatron-core only passes it along): megatron's TransformerBlock hands it to every layer and
keeps it among the saved inputs when it recomputes layers in backward, which a forward hook's side channel
would not survive. `context` is [k, N, h] (k feature sets for N image tokens), `context_mask` [2, s, b]: whether
each position of the [s, b, h] hidden states is an image token, and which feature row it takes. The rows are
gathered by the pads' running count (image_placement.feature_rows, as the embeddings are placed) rather than
at nonzero() positions, whose data-dependent size would read the count back from the GPU in every forward.
"""
from typing import Optional, Tuple

import torch
from megatron.core.transformer.transformer_layer import TransformerLayer

from ..common.image_placement import feature_rows


def deepstack_payload(features: torch.Tensor, pad_mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(context, context_mask) for the decoder: features [k, N, h] in the pads' batch-major order,
    pad_mask [b, s] with N True positions."""
    return features, torch.stack([pad_mask.long(), feature_rows(pad_mask)]).transpose(1, 2)


class DeepStackTransformerLayer(TransformerLayer):
    """A megatron TransformerLayer that, being global layer i < k, adds context[i] at context_mask's positions."""

    def forward(self, *args, **kwargs):
        output, context = super().forward(*args, **kwargs)
        features: Optional[torch.Tensor] = kwargs.get("context")
        index = self.layer_number - 1  # global over pipeline stages; only the first stage gets features
        if features is not None and index < features.shape[0]:
            is_pad, rows = kwargs["context_mask"]
            added = features[index].to(output.dtype)[rows]
            # out of place and not a view: a stage's last output goes to megatron's pipeline schedule
            output = output + torch.where(is_pad.bool().unsqueeze(-1), added, torch.zeros_like(added))
        return output, context

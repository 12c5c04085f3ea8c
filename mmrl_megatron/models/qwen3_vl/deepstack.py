"""DeepStack: vision features added to the language model's hidden states after its first layers.

Qwen3-VL's vision tower hands the language model, besides the embeddings that replace the image pads, one
feature row per image token from each of its `deepstack_visual_indexes` blocks; the k-th is added at the
image tokens to the output of decoder layer k (transformers' Qwen3VLTextModel._deepstack_process).

The features travel to the layers as the decoder's cross-attention `context` (our layers have no cross
attention, so megatron-core only passes it along): megatron's TransformerBlock hands it to every layer and
keeps it among the saved inputs when it recomputes layers in backward, which a forward hook's side channel
would not survive. `context` is [k, N, h] (k feature sets for N image tokens), `context_mask` the tokens'
[2, N] (sequence, batch) positions in the [s, b, h] hidden states.
"""
from typing import Optional, Tuple

import torch
from megatron.core.transformer.transformer_layer import TransformerLayer


def deepstack_payload(features: torch.Tensor, pad_mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(context, context_mask) for the decoder: features [k, N, h] in the pads' batch-major order,
    pad_mask [b, s] with N True positions."""
    batch, sequence = pad_mask.nonzero(as_tuple=True)
    return features, torch.stack([sequence, batch])


class DeepStackTransformerLayer(TransformerLayer):
    """A megatron TransformerLayer that, being global layer i < k, adds context[i] at context_mask's positions."""

    def forward(self, *args, **kwargs):
        output, context = super().forward(*args, **kwargs)
        features: Optional[torch.Tensor] = kwargs.get("context")
        index = self.layer_number - 1  # global over pipeline stages; only the first stage gets features
        if features is not None and index < features.shape[0]:
            sequence, batch = kwargs["context_mask"]
            # out of place and not a view: a stage's last output goes to megatron's pipeline schedule
            output = output.index_put((sequence, batch), features[index].to(output.dtype), accumulate=True)
        return output, context

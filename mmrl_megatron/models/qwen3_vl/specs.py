"""Qwen3-VL's layer specs: the common specs (models/common/specs.py) plus what this family adds.

Language layers: RMSNorm on every head's queries and keys (QK-norm) and the DeepStack layer class.
Vision layers: LayerNorm with bias instead of RMSNorm (the TE spec reads config.normalization itself).
"""
import copy

import torch
import torch.nn.functional as F

from ..common.norms import RMSNorm
from ..common.specs import decoder_spec, layer_spec
from .deepstack import DeepStackTransformerLayer


class LayerNorm(torch.nn.Module):
    """megatron norm-module contract (config, hidden_size, eps), weight and bias in params_dtype as the
    checkpoint stores them (megatron's WrappedTorchNorm keeps fp32 weights, which bf16 input cannot take)."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-6, **unused):
        super().__init__()
        self.eps = eps
        device = None if config.use_cpu_initialization else torch.cuda.current_device()
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype, device=device))
        self.bias = torch.nn.Parameter(torch.zeros(hidden_size, dtype=config.params_dtype, device=device))

    def forward(self, x):
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)


def _head_norm(backend: str):
    if backend == "te":
        from megatron.core.extensions.transformer_engine import TENorm

        return TENorm
    return RMSNorm


def language_decoder_spec(backend: str, config):
    """This stage's decoder: the common causal decoder whose layers are DeepStack layers with QK-norm."""
    spec = copy.deepcopy(decoder_spec(backend, config))
    layers = [spec] if backend == "te" else spec.layer_specs
    for layer in {id(layer): layer for layer in layers}.values():
        layer.module = DeepStackTransformerLayer
        attention = layer.submodules.self_attention.submodules
        attention.q_layernorm = attention.k_layernorm = _head_norm(backend)
    return spec


def vision_layer_spec(backend: str):
    """A bidirectional layer with LayerNorm (the local spec's norms replaced; TE's follow the config)."""
    spec = copy.deepcopy(layer_spec(backend, causal=False))
    if backend != "te":
        spec.submodules.input_layernorm = LayerNorm
        spec.submodules.pre_mlp_layernorm = LayerNorm
    return spec

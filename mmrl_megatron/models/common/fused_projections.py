"""One GEMM for a Qwen layer's query/key/value projections and one for its gate/up projections (the engine's).

At decode batch sizes a layer's projections are small GEMMs each of which also reads the normed activations:
the key and value projections of the 3B model are 256 columns wide, too narrow to occupy an H200, and every
projection is a kernel of its own. Serving engines concatenate them (SGLang's and vLLM's QKV and merged
gate/up linears); here too, at load time, so that prefill and decode run one GEMM for q/k/v and one for
gate/up. The split outputs are views, and each output column is the same dot product of the same rows as
HF's (a wider GEMM may block its sums differently: fp32 outputs then differ in the last bit).

Checkpoints and the weight bridge still name the separate tensors: `FusedWeightViews` answers such a name
with the rows of the concatenated weight that hold it, computed at each lookup (offloading swaps the
parameter's storage, so a view taken earlier would go stale).
"""
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch

from ..errors import ModelError

ATTENTION_PARTS = ("q_proj", "k_proj", "v_proj")
MLP_PARTS = ("gate_proj", "up_proj")


class ConcatenatedLinear(torch.nn.Module):
    """The linears `parts` (same input width, all with or all without bias) as one weight [sum(out), in];
    forward returns each part's output, as views of one GEMM's result."""

    def __init__(self, parts: Sequence[torch.nn.Linear]) -> None:
        super().__init__()
        if len({part.bias is None for part in parts}) != 1:
            raise ModelError("the projections to concatenate differ in having a bias")
        self.widths = [part.out_features for part in parts]
        self.weight = torch.nn.Parameter(torch.cat([part.weight for part in parts]), requires_grad=False)
        has_bias = parts[0].bias is not None
        self.bias = (torch.nn.Parameter(torch.cat([part.bias for part in parts]), requires_grad=False) if has_bias
                     else None)

    def forward(self, hidden: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        return torch.nn.functional.linear(hidden, self.weight, self.bias).split(self.widths, dim=-1)

    def part_rows(self, index: int) -> slice:
        start = sum(self.widths[:index])
        return slice(start, start + self.widths[index])


def _concatenate(owner: torch.nn.Module, part_names: Sequence[str], fused_name: str) -> ConcatenatedLinear:
    fused = ConcatenatedLinear([getattr(owner, name) for name in part_names])
    for name in part_names:
        delattr(owner, name)  # the separate weights would double the layer's memory
    setattr(owner, fused_name, fused)
    return fused


class FusedWeightViews:
    """Checkpoint-style names of the concatenated parts (`<layers prefix>.<i>.self_attn.q_proj.weight`, ...)
    -> the rows of the fused parameter that hold them."""

    def __init__(self) -> None:
        self._parts: Dict[str, Tuple[torch.nn.Module, str, slice]] = {}

    def add(self, prefix: str, fused: ConcatenatedLinear, part_names: Sequence[str]) -> None:
        for index, name in enumerate(part_names):
            rows = fused.part_rows(index)
            self._parts[f"{prefix}.{name}.weight"] = (fused, "weight", rows)
            if fused.bias is not None:
                self._parts[f"{prefix}.{name}.bias"] = (fused, "bias", rows)

    def __call__(self, name: str) -> Optional[torch.Tensor]:
        found = self._parts.get(name)
        if found is None:
            return None
        module, attribute, rows = found
        return getattr(module, attribute)[rows]


def fuse_layer_projections(layers: torch.nn.ModuleList, layers_prefix: str) -> FusedWeightViews:
    """Replace every layer's q/k/v projections by `self_attn.qkv_proj` and its gate/up projections by
    `mlp.gate_up_proj` (decode_layer.qwen_decoder_layer's layout); layers_prefix names `layers` in the module
    tree (e.g. "model.language_model.layers"). Returns the lookup of the former parameters' names."""
    views = FusedWeightViews()
    for index, layer in enumerate(layers):
        views.add(f"{layers_prefix}.{index}.self_attn",
                  _concatenate(layer.self_attn, ATTENTION_PARTS, "qkv_proj"), ATTENTION_PARTS)
        views.add(f"{layers_prefix}.{index}.mlp", _concatenate(layer.mlp, MLP_PARTS, "gate_up_proj"), MLP_PARTS)
    return views


def fused_model_weights(model: torch.nn.Module, layers_path: str) -> Callable[[str], Optional[torch.Tensor]]:
    """Fuse the projections of the decoder layers at `layers_path` in `model` (e.g.
    "model.language_model.layers") and return the lookup from a parameter's name in the module tree as it was
    before fusing to the tensor (or rows) holding it now; None for unknown names. Tied weights answer under
    each of their names."""
    fused_views = fuse_layer_projections(model.get_submodule(layers_path), layers_path)
    parameters = dict(model.named_parameters(remove_duplicate=False))

    def lookup(name: str) -> Optional[torch.Tensor]:
        found = parameters.get(name)
        return fused_views(name) if found is None else found

    return lookup

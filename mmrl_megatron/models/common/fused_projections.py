"""One GEMM for a Qwen layer's query/key/value projections and one for its gate/up projections (the engine's).

At decode batch sizes a layer's projections are small GEMMs each of which also reads the normed activations:
the key and value projections of the 3B model are 256 columns wide, too narrow to occupy an H200, and every
projection is a kernel of its own. Serving engines concatenate them (SGLang's and vLLM's QKV and merged
gate/up linears); here too, at load time, so that prefill and decode run one GEMM for q/k/v and one for
gate/up. The split outputs are views, and each output column is the same dot product of the same rows as
HF's (a wider GEMM may block its sums differently: fp32 outputs then differ in the last bit).

The parts can be padded with zero rows to an aligned width, and the linear they feed with zero weight columns
(InputPaddedLinear): the Qwen2.5-VL vision MLP's 3,420-wide rows are not 16-byte aligned in bf16, which sends
cuBLAS to slow kernels (embedded_vision.py).

Checkpoints and the weight bridge still name the separate tensors: `FusedWeightViews` answers such a name
with the rows (or columns) of the fused or padded weight that hold it, computed at each lookup (offloading
swaps the parameter's storage, so a view taken earlier would go stale).
"""
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import torch

from ..errors import ModelError

ATTENTION_PARTS = ("q_proj", "k_proj", "v_proj")
MLP_PARTS = ("gate_proj", "up_proj")


def padded_width(width: int, align: int) -> int:
    return -(-width // align) * align


class ConcatenatedLinear(torch.nn.Module):
    """The linears `parts` (same input width, all with or all without bias) as one weight [sum(out), in], each
    part's rows followed by zero rows up to a multiple of `align`; forward returns each part's output, as views
    of one GEMM's result (with `align` > 1 each is padded with zero columns to that width)."""

    def __init__(self, parts: Sequence[torch.nn.Linear], align: int = 1) -> None:
        super().__init__()
        if len({part.bias is None for part in parts}) != 1:
            raise ModelError("the projections to concatenate differ in having a bias")
        self.part_widths = [part.out_features for part in parts]
        self.widths = [padded_width(width, align) for width in self.part_widths]
        self.weight = torch.nn.Parameter(self._stacked([part.weight for part in parts]), requires_grad=False)
        has_bias = parts[0].bias is not None
        self.bias = (torch.nn.Parameter(self._stacked([part.bias for part in parts]), requires_grad=False)
                     if has_bias else None)

    def _stacked(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        stacked = tensors[0].new_zeros(sum(self.widths), *tensors[0].shape[1:])
        for index, tensor in enumerate(tensors):
            stacked[self.part_rows(index)] = tensor
        return stacked

    def forward(self, hidden: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        return torch.nn.functional.linear(hidden, self.weight, self.bias).split(self.widths, dim=-1)

    def part_rows(self, index: int) -> slice:
        start = sum(self.widths[:index])
        return slice(start, start + self.part_widths[index])


class InputPaddedLinear(torch.nn.Module):
    """`linear` with zero weight columns appended up to a multiple of `align` input features: it takes the
    padded outputs of a ConcatenatedLinear with that `align` (whose extra columns it multiplies by zero)."""

    def __init__(self, linear: torch.nn.Linear, align: int) -> None:
        super().__init__()
        self.in_features = linear.in_features
        weight = linear.weight.new_zeros(linear.out_features, padded_width(linear.in_features, align))
        weight[:, :self.in_features] = linear.weight
        self.weight = torch.nn.Parameter(weight, requires_grad=False)
        self.bias = linear.bias

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(hidden, self.weight, self.bias)


def concatenate_projections(owner: torch.nn.Module, part_names: Sequence[str], fused_name: str,
                            align: int = 1) -> ConcatenatedLinear:
    """Replace the linears `part_names` of `owner` by one ConcatenatedLinear `fused_name`."""
    fused = ConcatenatedLinear([getattr(owner, name) for name in part_names], align)
    for name in part_names:
        delattr(owner, name)  # the separate weights would double the layer's memory
    setattr(owner, fused_name, fused)
    return fused


class FusedWeightViews:
    """Checkpoint-style names of the concatenated or padded parts (`<layers prefix>.<i>.self_attn.q_proj.weight`,
    ...) -> the rows (or columns) of the parameter that hold them."""

    def __init__(self) -> None:
        self._parts: Dict[str, Tuple[torch.nn.Module, str, Union[slice, Tuple[slice, slice]]]] = {}

    def add(self, prefix: str, fused: ConcatenatedLinear, part_names: Sequence[str]) -> None:
        for index, name in enumerate(part_names):
            rows = fused.part_rows(index)
            self._parts[f"{prefix}.{name}.weight"] = (fused, "weight", rows)
            if fused.bias is not None:
                self._parts[f"{prefix}.{name}.bias"] = (fused, "bias", rows)

    def add_input_padded(self, prefix: str, linear: InputPaddedLinear) -> None:
        """`<prefix>.weight`: the columns of `linear`'s weight that are not padding."""
        self._parts[f"{prefix}.weight"] = (linear, "weight", (slice(None), slice(0, linear.in_features)))

    def __call__(self, name: str) -> Optional[torch.Tensor]:
        found = self._parts.get(name)
        if found is None:
            return None
        module, attribute, index = found
        return getattr(module, attribute)[index]


def fuse_layer_projections(layers: torch.nn.ModuleList, layers_prefix: str) -> FusedWeightViews:
    """Replace every layer's q/k/v projections by `self_attn.qkv_proj` and its gate/up projections by
    `mlp.gate_up_proj` (decode_layer.qwen_decoder_layer's layout); layers_prefix names `layers` in the module
    tree (e.g. "model.language_model.layers"). Returns the lookup of the former parameters' names."""
    views = FusedWeightViews()
    for index, layer in enumerate(layers):
        views.add(f"{layers_prefix}.{index}.self_attn",
                  concatenate_projections(layer.self_attn, ATTENTION_PARTS, "qkv_proj"), ATTENTION_PARTS)
        views.add(f"{layers_prefix}.{index}.mlp", concatenate_projections(layer.mlp, MLP_PARTS, "gate_up_proj"),
                  MLP_PARTS)
    return views


def fused_model_weights(model: torch.nn.Module, layers_path: str,
                        *more_views: FusedWeightViews) -> Callable[[str], Optional[torch.Tensor]]:
    """Fuse the projections of the decoder layers at `layers_path` in `model` (e.g.
    "model.language_model.layers") and return the lookup from a parameter's name in the module tree as it was
    before fusing to the tensor (or rows) holding it now, `more_views` answering for parts fused or padded
    elsewhere (before the parameters, whose padded tensors may carry the same names); None for unknown names.
    Tied weights answer under each of their names."""
    views = (fuse_layer_projections(model.get_submodule(layers_path), layers_path), *more_views)
    parameters = dict(model.named_parameters(remove_duplicate=False))

    def lookup(name: str) -> Optional[torch.Tensor]:
        for view in views:
            found = view(name)
            if found is not None:
                return found
        return parameters.get(name)

    return lookup

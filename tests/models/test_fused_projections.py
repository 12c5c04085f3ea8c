"""The engine's concatenated projections: the same outputs as the separate linears, and the separate names
still reach the rows that hold them, also after the parameters' storage has been swapped."""
import pytest
import torch

from mmrl_megatron.models.common.fused_projections import ConcatenatedLinear, fused_model_weights
from mmrl_megatron.models.errors import ModelError


class _Attention(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = torch.nn.Linear(8, 12)
        self.k_proj = torch.nn.Linear(8, 4)
        self.v_proj = torch.nn.Linear(8, 4)


class _Mlp(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate_proj = torch.nn.Linear(8, 16, bias=False)
        self.up_proj = torch.nn.Linear(8, 16, bias=False)


class _Layer(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.self_attn = _Attention()
        self.mlp = _Mlp()


class _Model(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList([_Layer(), _Layer()])
        self.norm = torch.nn.LayerNorm(8)


def test_concatenated_outputs_equal_the_separate_linears():
    """Within 1e-6 in fp32: the wider GEMM may block its sums differently, nothing more."""
    torch.manual_seed(0)
    parts = [torch.nn.Linear(8, 12), torch.nn.Linear(8, 4), torch.nn.Linear(8, 4)]
    hidden = torch.randn(3, 5, 8)
    fused = ConcatenatedLinear(parts)
    for part, output in zip(parts, fused(hidden), strict=True):
        torch.testing.assert_close(output, part(hidden), rtol=0, atol=1e-6)


def test_separate_names_reach_the_fused_rows_after_the_storage_moves():
    """A checkpoint tensor copied through the lookup lands in the fused weight (hence in the GEMM), also after
    .to() has swapped every parameter's storage, as offloading does; other names keep their parameters."""
    torch.manual_seed(0)
    model = _Model()
    q_weight, v_bias = model.layers[1].self_attn.q_proj.weight.clone(), model.layers[1].self_attn.v_proj.bias.clone()
    lookup = fused_model_weights(model, "layers")
    assert not hasattr(model.layers[0].self_attn, "q_proj")
    torch.testing.assert_close(lookup("layers.1.self_attn.q_proj.weight"), q_weight, rtol=0, atol=0)
    torch.testing.assert_close(lookup("layers.1.self_attn.v_proj.bias"), v_bias, rtol=0, atol=0)
    assert lookup("layers.0.mlp.gate_proj.bias") is None  # the MLP has no bias
    assert lookup("layers.0.mlp.down_proj.weight") is None  # never existed
    assert lookup("norm.weight") is model.norm.weight

    model.to(torch.float64)
    new_up = torch.randn(16, 8, dtype=torch.float64)
    with torch.no_grad():
        lookup("layers.0.mlp.up_proj.weight").copy_(new_up)
    fused = model.layers[0].mlp.gate_up_proj
    torch.testing.assert_close(fused.weight[16:], new_up, rtol=0, atol=0)
    hidden = torch.randn(2, 8, dtype=torch.float64)
    torch.testing.assert_close(fused(hidden)[1], hidden @ new_up.T, rtol=0, atol=0)


def test_parts_that_differ_in_bias_are_refused():
    with pytest.raises(ModelError, match="bias"):
        ConcatenatedLinear([torch.nn.Linear(8, 4), torch.nn.Linear(8, 4, bias=False)])


def test_padded_parts_give_the_separate_outputs_and_names_reach_the_unpadded_weights():
    """With `align`, each concatenated part is padded with zero rows (its output with zero columns) and the
    linear after them takes the padded width with zero weight columns: the MLP's output equals the separate
    linears' within 1e-6, and the checkpoint names reach exactly the unpadded rows and columns, whose copies
    reach the GEMMs."""
    from mmrl_megatron.models.common.fused_projections import MLP_PARTS, FusedWeightViews, InputPaddedLinear

    torch.manual_seed(0)
    gate, up, down = torch.nn.Linear(8, 6), torch.nn.Linear(8, 6), torch.nn.Linear(6, 8)
    hidden = torch.randn(3, 8)
    expected = down(torch.nn.functional.silu(gate(hidden)) * up(hidden))
    fused, padded_down = ConcatenatedLinear([gate, up], align=4), InputPaddedLinear(down, align=4)
    fused_gate, fused_up = fused(hidden)
    assert fused_gate.shape == (3, 8) and not fused_gate[:, 6:].any() and not fused_up[:, 6:].any()
    torch.testing.assert_close(padded_down(torch.nn.functional.silu(fused_gate) * fused_up), expected, rtol=0,
                               atol=1e-6)

    views = FusedWeightViews()
    views.add("mlp", fused, MLP_PARTS)
    views.add_input_padded("mlp.down_proj", padded_down)
    assert views("mlp.up_proj.bias").shape == (6,) and views("mlp.down_proj.weight").shape == (8, 6)
    new_down, new_up = torch.randn(8, 6), torch.randn(6, 8)
    with torch.no_grad():
        views("mlp.down_proj.weight").copy_(new_down)
        views("mlp.up_proj.weight").copy_(new_up)
    assert not padded_down.weight[:, 6:].any() and not fused.weight[6:8].any() and not fused.weight[14:].any()
    torch.testing.assert_close(fused(hidden)[1][:, :6], hidden @ new_up.T + up.bias, rtol=0, atol=1e-6)
    torch.testing.assert_close(padded_down(torch.ones(1, 8)), new_down.sum(1)[None] + down.bias, rtol=0, atol=1e-6)

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

"""The RMSNorm's Triton backward (norm_kernels.py) against autograd through torch's rms_norm in float64.

The kernel runs in Triton's interpreter on CPU tensors (TRITON_INTERPRET=1 must be set before the kernels'
module is imported, hence a spawned process); the same kernel runs compiled on a GPU (the gpu test)."""
import types

import pytest
import torch

from tests.cpu_ranks import run_on_cpu_ranks

EPSILON = 1e-6


def _reference(x: torch.Tensor, grad: torch.Tensor, weight: torch.Tensor):
    """(dx, dweight) by autograd through torch's rms_norm in float64."""
    x64, weight64 = (t.detach().double().requires_grad_() for t in (x, weight))
    out = torch.nn.functional.rms_norm(x64, (x.shape[-1],), weight64, EPSILON)
    return torch.autograd.grad(out, (x64, weight64), grad.double())


def _cases(device: str, dtype: torch.dtype, shapes):
    from mmrl_megatron.models.common.norm_kernels import rms_norm_backward

    generator = torch.Generator().manual_seed(0)
    cases = []
    for shape in shapes:
        x = (torch.randn(shape, generator=generator) * 3).to(device, dtype)
        grad = torch.randn(shape, generator=generator).to(device, dtype)
        weight = (1 + 0.1 * torch.randn(shape[-1], generator=generator)).to(device, dtype)
        grad_x, grad_weight = rms_norm_backward(x, grad, weight, EPSILON)
        expected_x, expected_weight = _reference(x.cpu(), grad.cpu(), weight.cpu())
        cases.append((grad_x.cpu(), grad_weight.cpu(), expected_x, expected_weight))
    return cases


def _interpreted_cases():
    # a width that is not a power of two, over two programs on the CPU (37 rows: the second one's last row is
    # masked); a QK-norm's [tokens, 1, heads, head_dim] input
    return _cases("cpu", torch.float32, [(37, 3000), (5, 1, 3, 16)])


def test_backward_equals_autograd_through_rms_norm(monkeypatch):
    """Invariant: the input's and the weight's gradients equal autograd's through torch's rms_norm within 1e-5
    (fp32, relative to the largest entry), in the input's shape and dtype."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    [cases] = run_on_cpu_ranks(1, _interpreted_cases)
    for grad_x, grad_weight, expected_x, expected_weight in cases:
        assert grad_x.shape == expected_x.shape and grad_x.dtype == torch.float32
        assert (grad_x.double() - expected_x).abs().max() <= 1e-5 * expected_x.abs().max()
        assert (grad_weight.double() - expected_weight).abs().max() <= 1e-5 * expected_weight.abs().max()


@pytest.mark.gpu
def test_backward_on_gpu_at_the_3b_width():
    """Invariant: compiled on a GPU, in bf16 at 4,096 x 2,048 (the 3B update's micro-batch), the gradients are
    within two bf16 steps of float64 autograd (2**-6 of the largest entry), and the module takes the kernel."""
    from mmrl_megatron.models.common import norms

    for grad_x, grad_weight, expected_x, expected_weight in _cases("cuda", torch.bfloat16, [(4096, 2048)]):
        assert (grad_x.double() - expected_x).abs().max() <= 2 ** -6 * expected_x.abs().max()
        assert (grad_weight.double() - expected_weight).abs().max() <= 2 ** -6 * expected_weight.abs().max()
    config = types.SimpleNamespace(use_cpu_initialization=False, params_dtype=torch.bfloat16, sequence_parallel=False)
    norm = norms.RMSNorm(config, 64, eps=EPSILON)
    out = norm(torch.randn(8, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True))
    assert "FusedBackwardRMSNorm" in type(out.grad_fn).__name__

"""The fused RoPE that fills megatron-core's slot on GPUs without Transformer Engine (a Triton kernel for fully
rotated heads, compiled arithmetic for partly rotated ones) computes megatron's own unfused rotary embedding,
forward and backward (that the layers route through it is checked in tests/trainer/test_hot_path_gpu.py)."""
import pytest
import torch

from mmrl_megatron.models.common import fused_rope
from tests.cpu_ranks import run_on_cpu_ranks


def _inputs(device, dtype, rotated_width):
    generator = torch.Generator().manual_seed(0)
    t = torch.randn(37, 1, 4, 16, generator=generator).to(device, dtype).requires_grad_()
    freqs = (torch.rand(37, 1, 1, rotated_width, generator=generator) * 40).to(device)
    return t, freqs


def _megatron_unfused(t, freqs):
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

    return _apply_rotary_pos_emb_bshd(t, freqs)


@pytest.mark.parametrize("rotated_width", [16, 8])
def test_rotary_arithmetic_is_megatrons(rotated_width):
    """Invariant: the function the slot compiles equals megatron-core's unfused RoPE exactly in fp32, for a
    fully rotated head (the language model) and a partly rotated one (an unrotated tail is kept)."""
    t, freqs = _inputs("cpu", torch.float32, rotated_width)
    ours, reference = fused_rope._rotary(t, freqs), _megatron_unfused(t, freqs)
    assert torch.equal(ours, reference)


def test_interleaved_layout_is_refused():
    """Invariant: a layout the fused kernels do not cover fails with a message, never silently."""
    t, freqs = _inputs("cpu", torch.float32, 16)
    with pytest.raises(NotImplementedError, match="interleaved"):
        fused_rope.fused_rotary_pos_emb(t, freqs, interleaved=True)


def _triton_rotary_against_unfused():
    """(Triton output, unfused output, Triton input gradient, unfused input gradient), fp32 on the CPU."""
    t, freqs = _inputs("cpu", torch.float32, 16)
    weights = torch.randn(t.shape, generator=torch.Generator().manual_seed(1))
    ours = fused_rope._TritonRotary.apply(t, freqs)
    (grad_ours,) = torch.autograd.grad((ours * weights).sum(), t)
    reference = _megatron_unfused(t, freqs)
    (grad_reference,) = torch.autograd.grad((reference * weights).sum(), t)
    return ours.detach(), reference.detach(), grad_ours, grad_reference


def test_triton_rotary_forward_and_backward_are_megatrons(monkeypatch):
    """Invariant: the Triton kernel (run by Triton's CPU interpreter, set before the kernels' module is imported:
    hence a spawned process) gives megatron's unfused RoPE and its input gradient within 1e-5 in fp32, with
    different angles in the two halves (the backward is the rotation's transpose, not the negated rotation)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    [(ours, reference, grad_ours, grad_reference)] = run_on_cpu_ranks(1, _triton_rotary_against_unfused)
    assert ours.shape == reference.shape
    assert (ours - reference).abs().max() < 1e-5
    assert (grad_ours - grad_reference).abs().max() < 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("rotated_width", [16, 8])
def test_fused_rotary_matches_unfused_on_gpu(rotated_width):
    """Invariant: the fused kernels' bf16 output and input gradient (Triton's for 16 rotated columns of 16, the
    compiled one for 8) equal megatron's unfused RoPE computed in fp32 on the same values within two bf16
    rounding steps (rtol 2**-7, atol 1e-2: values reach about 5)."""
    t, freqs = _inputs("cuda", torch.bfloat16, rotated_width)
    weights = torch.randn_like(t)
    ours = fused_rope.fused_rotary_pos_emb(t, freqs)
    (grad_ours,) = torch.autograd.grad((ours * weights).sum(), t)
    exact_input = t.detach().float().requires_grad_()
    exact = _megatron_unfused(exact_input, freqs)
    (grad_exact,) = torch.autograd.grad((exact * weights.float()).sum(), exact_input)
    assert torch.allclose(ours.float(), exact, rtol=2 ** -7, atol=1e-2)
    assert torch.allclose(grad_ours.float(), grad_exact, rtol=2 ** -7, atol=1e-2)

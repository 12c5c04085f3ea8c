"""The compiled RoPE that fills megatron-core's fused slot on GPUs without Transformer Engine computes
megatron's own unfused rotary embedding, forward and backward (that the layers route through it is checked
in tests/trainer/test_hot_path_gpu.py)."""
import pytest
import torch

from mmrl_megatron.models.common import fused_rope


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
    """Invariant: a layout the compiled kernel does not cover fails with a message, never silently."""
    t, freqs = _inputs("cpu", torch.float32, 16)
    with pytest.raises(NotImplementedError, match="interleaved"):
        fused_rope.compiled_rotary_pos_emb(t, freqs, interleaved=True)


@pytest.mark.gpu
@pytest.mark.parametrize("rotated_width", [16, 8])
def test_compiled_rotary_matches_unfused_on_gpu(rotated_width):
    """Invariant: the compiled kernel's bf16 output and input gradient equal megatron's unfused RoPE computed in
    fp32 on the same values within two bf16 rounding steps (rtol 2**-7, atol 1e-2: values reach about 5)."""
    t, freqs = _inputs("cuda", torch.bfloat16, rotated_width)
    weights = torch.randn_like(t)
    ours = fused_rope.compiled_rotary_pos_emb(t, freqs)
    (grad_ours,) = torch.autograd.grad((ours * weights).sum(), t)
    exact_input = t.detach().float().requires_grad_()
    exact = _megatron_unfused(exact_input, freqs)
    (grad_exact,) = torch.autograd.grad((exact * weights.float()).sum(), exact_input)
    assert torch.allclose(ours.float(), exact, rtol=2 ** -7, atol=1e-2)
    assert torch.allclose(grad_ours.float(), grad_exact, rtol=2 ** -7, atol=1e-2)

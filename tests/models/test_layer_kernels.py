"""The engine layers' Triton rotary and SwiGLU kernels (layer_kernels.py) against the eager formulas.

The kernels run in Triton's interpreter on CPU tensors (TRITON_INTERPRET=1 must be set before the kernels'
module is imported, hence a spawned process); the same kernels run compiled on a GPU (the gpu test). Inputs
are the strided views the layers hand over: a query and key split from one q/k/v projection output, the
vision tower's [patches, 3, heads, width] permutation, the gate and up halves of one GEMM output."""
import pytest
import torch

from tests.cpu_ranks import run_on_cpu_ranks


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def _rotated(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF's apply_rotary_pos_emb for x [T, heads, D] and cos/sin [T, D], in float64."""
    x, cos, sin = x.double(), cos.double()[:, None], sin.double()[:, None]
    return x * cos + _rotate_half(x) * sin


def _projection_views(tokens: int, heads: int, kv_heads: int, width: int, dtype, generator):
    """query [T, heads, D] and key [T, kv_heads, D] as views of one q/k/v projection output (token stride =
    the projection's width), and cos/sin [T, D]."""
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * width, generator=generator).to(dtype)
    query = qkv[:, :heads * width].view(tokens, heads, width)
    key = qkv[:, heads * width:(heads + kv_heads) * width].view(tokens, kv_heads, width)
    angles = torch.rand(tokens, width // 2, generator=generator) * 6.3
    angles = torch.cat([angles, angles], dim=-1)
    return query, key, angles.cos().to(dtype), angles.sin().to(dtype)


def _vision_views(patches: int, heads: int, width: int, generator):
    """query and key as the vision tower unbinds them from qkv(hidden).reshape(S, 3, heads, D).permute(1, 0, 2, 3),
    with fp32 cos/sin (the tower's rotary tables)."""
    qkv = torch.randn(patches, 3 * heads * width, generator=generator)
    query, key, _ = qkv.reshape(patches, 3, heads, width).permute(1, 0, 2, 3).unbind(0)
    angles = torch.rand(patches, width // 2, generator=generator) * 6.3
    angles = torch.cat([angles, angles], dim=-1)
    return query, key, angles.cos(), angles.sin()


def _rotary_cases():
    from mmrl_megatron.models.common.layer_kernels import rotate_query_key

    generator = torch.Generator().manual_seed(0)
    cases = []
    for query, key, cos, sin in (_projection_views(5, 16, 2, 128, torch.float32, generator),
                                 _projection_views(5, 28, 4, 128, torch.bfloat16, generator),
                                 _vision_views(7, 4, 80, generator)):
        rotated_query, rotated_key = rotate_query_key(query, key, cos, sin)
        cases.append((rotated_query, rotated_key, _rotated(query, cos, sin), _rotated(key, cos, sin)))
    return cases


def _swiglu_cases():
    from mmrl_megatron.models.common.layer_kernels import SWIGLU_BLOCK, swiglu

    generator = torch.Generator().manual_seed(1)
    cases = []
    for dtype in (torch.float32, torch.bfloat16):
        columns = SWIGLU_BLOCK + 476  # two blocks per row, the second one masked
        gate_up = torch.randn(3, 4, 2 * columns, generator=generator).to(dtype)
        gate, up = gate_up.split(columns, dim=-1)
        expected = torch.nn.functional.silu(gate.double()) * up.double()
        cases.append((swiglu(gate, up), expected))
    return cases


@pytest.fixture
def interpreted(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _within_one_rounding(mine: torch.Tensor, expected: torch.Tensor) -> bool:
    """fp32 outputs within 1e-6 of float64; bf16 ones within one bf16 step of it (2^-7 relative: Triton's CPU
    interpreter truncates where a GPU rounds; 1e-6 absolute where the fp32 sums cancel)."""
    if mine.dtype == torch.float32:
        return bool((mine.double() - expected).abs().max() < 1e-6)
    return bool(((mine.double() - expected).abs() <= expected.abs() * 2 ** -7 + 1e-6).all())


def test_rotary_kernel_equals_hf_rotary_on_the_layers_strided_views(interpreted):
    """Invariant: the kernel rotates strided query/key views (3B's 16/2 heads in fp32, 7B's 28/4 in bf16, the
    vision tower's 80-wide heads, whose half is not a power of two) as HF's formula does, into contiguous
    tensors of the input's shape and dtype."""
    [cases] = run_on_cpu_ranks(1, _rotary_cases)
    for rotated_query, rotated_key, expected_query, expected_key in cases:
        for mine, expected in ((rotated_query, expected_query), (rotated_key, expected_key)):
            assert mine.shape == expected.shape and mine.is_contiguous()
            assert _within_one_rounding(mine, expected)


def test_swiglu_kernel_equals_silu_times_up_on_split_halves(interpreted):
    """Invariant: silu(gate) * up over the two halves of one GEMM output (rows longer than one block), in fp32
    within 1e-6 and in bf16 within one step, as a contiguous tensor of the halves' shape and dtype."""
    [cases] = run_on_cpu_ranks(1, _swiglu_cases)
    for mine, expected in cases:
        assert mine.shape == expected.shape and mine.is_contiguous()
        assert _within_one_rounding(mine, expected)


@pytest.mark.gpu
def test_compiled_layer_kernels_on_gpu():
    """Invariant: compiled on a GPU, at the 3B decode and prefill shapes and the 7B tower's, the kernels give HF's
    formulas within one bf16 step."""
    from mmrl_megatron.models.common.layer_kernels import rotate_query_key, swiglu

    generator = torch.Generator().manual_seed(0)
    for tokens in (256, 16384):
        query, key, cos, sin = (x.cuda() for x in _projection_views(tokens, 16, 2, 128, torch.bfloat16, generator))
        for mine, source in zip(rotate_query_key(query, key, cos, sin), (query, key)):
            assert _within_one_rounding(mine.cpu(), _rotated(source.cpu(), cos.cpu(), sin.cpu()))
        gate_up = torch.randn(tokens, 2 * 11008, generator=generator).bfloat16().cuda()
        gate, up = gate_up.split(11008, dim=-1)
        expected = torch.nn.functional.silu(gate.cpu().double()) * up.cpu().double()
        assert _within_one_rounding(swiglu(gate, up).cpu(), expected)
    query, key, cos, sin = (x.cuda() for x in _vision_views(4096, 16, 80, generator))
    for mine, source in zip(rotate_query_key(query, key, cos, sin), (query, key)):
        assert bool(((mine.cpu().double() - _rotated(source.cpu(), cos.cpu(), sin.cpu())).abs() < 1e-5).all())

"""The Triton decode attention (decode_attention.py) against float64 attention over each slot's own cache prefix.

The kernels run in Triton's interpreter on CPU tensors (TRITON_INTERPRET=1 must be set before the kernels'
module is imported, hence a spawned process); the same kernels run compiled on a GPU (the gpu test). The
cache holds NaN past every slot's length and past kv_len, so a kernel that read a position it should not
would return NaN."""
import pytest
import torch

from tests.cpu_ranks import run_on_cpu_ranks

CACHE_LEN, KV_LEN = 320, 256  # the cache view is longer than the step's KV bucket
LENGTHS = [1, 63, 64, 65, 200, 256]  # one loop step and its edges, several splits, the whole bucket


def _inputs(seed: int, kv_heads: int, groups: int, width: int, value_width: int):
    generator = torch.Generator().manual_seed(seed)
    slots = len(LENGTHS)
    query = torch.randn(slots, kv_heads * groups, width, generator=generator, dtype=torch.float64)
    keys = torch.randn(slots, kv_heads, CACHE_LEN, width, generator=generator, dtype=torch.float64) * 2
    values = torch.randn(slots, kv_heads, CACHE_LEN, value_width, generator=generator, dtype=torch.float64)
    for slot, length in enumerate(LENGTHS):
        keys[slot, :, length:] = float("nan")
        values[slot, :, length:] = float("nan")
    return query, keys, values, torch.tensor(LENGTHS)


def _reference(query, keys, values, lengths, scale):
    """float64 softmax attention of each slot's query heads over its first `length` positions (GQA:
    consecutive query heads share a KV head)."""
    groups = query.shape[1] // keys.shape[1]
    out = []
    for slot, length in enumerate(lengths.tolist()):
        k = keys[slot, :, :length].repeat_interleave(groups, dim=0)  # [heads, length, D]
        v = values[slot, :, :length].repeat_interleave(groups, dim=0)
        weights = torch.softmax(torch.einsum("hd,hnd->hn", query[slot], k) * scale, dim=-1)
        out.append(torch.einsum("hn,hnd->hd", weights, v))
    return torch.stack(out)


def _kernel(query, keys, values, lengths, scale, dtype):
    from mmrl_megatron.models.common.decode_attention import decode_attention

    return decode_attention(query.to(dtype), keys.to(dtype), values.to(dtype), lengths, KV_LEN, scale)


@pytest.fixture
def interpreted(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.mark.parametrize("kv_heads,groups,width,value_width",
                         [(2, 8, 128, 128), (1, 7, 64, 64), (2, 1, 32, 48), (2, 2, 8, 8)],
                         ids=["qwen-3b", "seven-groups", "one-group-wider-values", "narrower-than-a-tile"])
def test_decode_attention_matches_float64_per_slot_attention(interpreted, kv_heads, groups, width, value_width):
    """Invariant: in fp32 the kernels equal float64 attention over each slot's first `length` positions within
    1e-5 (Qwen2.5-VL-3B's 8 query heads per KV head, 7B's 7, one head per KV head with values wider than keys,
    widths under the 16 of a dot tile, as the tests' tiny models have), whatever lies beyond the length."""
    query, keys, values, lengths = _inputs(0, kv_heads, groups, width, value_width)
    scale = width ** -0.5
    expected = _reference(query, keys, values, lengths, scale)
    [mine] = run_on_cpu_ranks(1, _kernel, query, keys, values, lengths, scale, torch.float32)
    assert mine.shape == expected.shape and mine.dtype == torch.float32
    assert (mine.double() - expected).abs().max() < 1e-5


def test_bfloat16_cache_gives_bfloat16_attention(interpreted):
    """Invariant: a bf16 cache is read as it is (fp32 softmax and sums inside); the output is bf16 and within
    bf16 rounding (2e-2) of float64 attention over the same bf16 values."""
    query, keys, values, lengths = _inputs(1, 2, 8, 128, 128)
    query, keys, values = (x.to(torch.bfloat16).double() for x in (query, keys, values))
    expected = _reference(query, keys, values, lengths, 128 ** -0.5)
    [mine] = run_on_cpu_ranks(1, _kernel, query, keys, values, lengths, 128 ** -0.5, torch.bfloat16)
    assert mine.dtype == torch.bfloat16
    assert (mine.double() - expected).abs().max() < 2e-2


def test_splits_fill_the_gpu_but_never_go_below_one_loop_step():
    """Invariant: a wide batch takes one split per (slot, KV head), a narrow one as many as fill the target
    program count, and no split is shorter than one 64-position loop step."""
    from mmrl_megatron.models.common.decode_attention import split_count

    assert split_count(512, 2, 512) == 1
    assert split_count(256, 2, 512) == 2
    assert split_count(1, 2, 4096) == 64
    assert split_count(1, 2, 100) == 2


@pytest.mark.gpu
def test_compiled_kernels_match_masked_sdpa_on_gpu():
    """Invariant: compiled on a GPU in bf16, the kernels give what the engine's masked SDPA gave (within 2e-2,
    bf16 rounding of the output) at the 3B shape: 256 slots of ragged lengths up to 512, 2 KV heads of 8
    query heads."""
    from mmrl_megatron.models.common.decode_attention import decode_attention

    generator = torch.Generator(device="cuda").manual_seed(0)
    slots, kv_heads, groups, width, kv_len = 256, 2, 8, 128, 512
    query = torch.randn(slots, kv_heads * groups, width, device="cuda", generator=generator).bfloat16()
    keys = torch.randn(slots, kv_heads, 1024, width, device="cuda", generator=generator).bfloat16()
    values = torch.randn(slots, kv_heads, 1024, width, device="cuda", generator=generator).bfloat16()
    lengths = torch.randint(1, kv_len + 1, (slots,), device="cuda", generator=generator)
    visible = torch.arange(kv_len, device="cuda")[None, :] < lengths[:, None]
    bias = torch.zeros(visible.shape, device="cuda").masked_fill(~visible, float("-inf"))[:, None, None]
    expected = torch.nn.functional.scaled_dot_product_attention(
        query.view(slots, kv_heads, groups, width), keys[:, :, :kv_len], values[:, :, :kv_len],
        attn_mask=bias.bfloat16(), scale=width ** -0.5).reshape(slots, kv_heads * groups, width)
    mine = decode_attention(query, keys, values, lengths, kv_len, width ** -0.5)
    assert (mine.float() - expected.float()).abs().max() < 2e-2

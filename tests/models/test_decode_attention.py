"""The Triton decode attention (decode_attention.py) against float64 attention over each slot's own cache prefix.

The kernels run in Triton's interpreter on CPU tensors (TRITON_INTERPRET=1 must be set before the kernels'
module is imported, hence a spawned process); the same kernels run compiled on a GPU (the gpu test). The
cache holds NaN past every slot's length and past kv_len, and at the position the new token is written to, so
a kernel that read a position it should not, or the stale entry instead of the new token's, would return NaN."""
import pytest
import torch

from tests.cpu_ranks import run_on_cpu_ranks

CACHE_LEN, KV_LEN = 320, 256  # the cache view is longer than the step's KV bucket
LENGTHS = [1, 63, 64, 65, 200, 256]  # one loop step and its edges, several splits, the whole bucket
BEYOND_LENGTH = 300  # the last slot's write position: past its length (an idle slot), so nothing is stored


def _inputs(seed: int, kv_heads: int, groups: int, width: int, value_width: int):
    """query, the new token's keys/values, the cache, its write positions and lengths: every slot but the last
    writes its new token at length - 1 (a running slot); the last one's write position lies past its length."""
    generator = torch.Generator().manual_seed(seed)
    slots = len(LENGTHS)
    query = torch.randn(slots, kv_heads * groups, width, generator=generator, dtype=torch.float64)
    new_keys = torch.randn(slots, kv_heads, width, generator=generator, dtype=torch.float64) * 2
    new_values = torch.randn(slots, kv_heads, value_width, generator=generator, dtype=torch.float64)
    keys = torch.randn(slots, kv_heads, CACHE_LEN, width, generator=generator, dtype=torch.float64) * 2
    values = torch.randn(slots, kv_heads, CACHE_LEN, value_width, generator=generator, dtype=torch.float64)
    writes = torch.tensor([length - 1 for length in LENGTHS[:-1]] + [BEYOND_LENGTH])
    for slot, (length, write) in enumerate(zip(LENGTHS, writes.tolist())):
        keys[slot, :, min(length, write):] = float("nan")
        values[slot, :, min(length, write):] = float("nan")
    return query, new_keys, new_values, keys, values, writes, torch.tensor(LENGTHS)


def _written(keys, new_keys, writes, lengths):
    """The cache after the step: each new key at its write position where that lies below the length."""
    keys = keys.clone()
    for slot, (write, length) in enumerate(zip(writes.tolist(), lengths.tolist())):
        if write < length:
            keys[slot, :, write] = new_keys[slot]
    return keys


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


def _kernel(query, new_keys, new_values, keys, values, writes, lengths, scale, dtype):
    """The kernels' output and the cache they wrote into."""
    from mmrl_megatron.models.common.decode_attention import decode_attention

    keys, values = keys.to(dtype), values.to(dtype)
    out = decode_attention(query.to(dtype), new_keys.to(dtype), new_values.to(dtype), keys, values, writes,
                           lengths, KV_LEN, scale)
    return out, keys, values


@pytest.fixture
def interpreted(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.mark.parametrize("kv_heads,groups,width,value_width",
                         [(2, 8, 128, 128), (1, 7, 64, 64), (2, 1, 32, 48), (2, 2, 8, 8)],
                         ids=["qwen-3b", "seven-groups", "one-group-wider-values", "narrower-than-a-tile"])
def test_decode_attention_matches_float64_per_slot_attention(interpreted, kv_heads, groups, width, value_width):
    """Invariant: in fp32 the kernels store the new token's key and value at each running slot's write position
    (exactly, and nothing for a slot whose write position lies past its length) and equal float64 attention
    over each slot's first `length` positions of that cache within 1e-5 (Qwen2.5-VL-3B's 8 query heads per KV
    head, 7B's 7, one head per KV head with values wider than keys, widths under the 16 of a dot tile, as the
    tests' tiny models have), whatever lies beyond the length."""
    query, new_keys, new_values, keys, values, writes, lengths = _inputs(0, kv_heads, groups, width, value_width)
    scale = width ** -0.5
    keys_after, values_after = _written(keys, new_keys, writes, lengths), _written(values, new_values, writes, lengths)
    expected = _reference(query, keys_after, values_after, lengths, scale)
    [(mine, cached_keys, cached_values)] = run_on_cpu_ranks(1, _kernel, query, new_keys, new_values, keys, values,
                                                            writes, lengths, scale, torch.float32)
    assert mine.shape == expected.shape and mine.dtype == torch.float32
    assert (mine.double() - expected).abs().max() < 1e-5
    torch.testing.assert_close(cached_keys.double(), keys_after.float().double(), rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(cached_values.double(), values_after.float().double(), rtol=0, atol=0,
                               equal_nan=True)


def test_bfloat16_cache_gives_bfloat16_attention(interpreted):
    """Invariant: a bf16 cache is read as it is (fp32 softmax and sums inside); the output is bf16 and within
    bf16 rounding (2e-2) of float64 attention over the same bf16 values."""
    inputs = [x.to(torch.bfloat16).double() if x.is_floating_point() else x for x in _inputs(1, 2, 8, 128, 128)]
    query, new_keys, new_values, keys, values, writes, lengths = inputs
    expected = _reference(query, _written(keys, new_keys, writes, lengths), _written(values, new_values, writes,
                                                                                    lengths), lengths, 128 ** -0.5)
    [(mine, _, _)] = run_on_cpu_ranks(1, _kernel, *inputs, 128 ** -0.5, torch.bfloat16)
    assert mine.dtype == torch.bfloat16
    assert (mine.double() - expected).abs().max() < 2e-2


def test_splits_fill_the_gpu_but_never_go_below_one_loop_step():
    """Invariant: a wide batch takes one split per (slot, KV head), a narrow one as many as fill the target
    program count up to the merge's 64, and no split is shorter than one 64-position loop step."""
    from mmrl_megatron.models.common.decode_attention import split_count

    assert split_count(512, 2, 512) == 1
    assert split_count(256, 2, 512) == 2
    assert split_count(1, 2, 4096) == 64
    assert split_count(1, 2, 32768) == 64
    assert split_count(1, 2, 100) == 2


@pytest.mark.gpu
def test_compiled_kernels_match_masked_sdpa_on_gpu():
    """Invariant: compiled on a GPU in bf16, the kernels give what the engine's masked SDPA gave after writing
    the new token's key and value (within 2e-2, bf16 rounding of the output) at the 3B shape: 256 slots of
    ragged lengths up to 512, 2 KV heads of 8 query heads; and one slot alone at 2,048 cached positions (the
    64 splits the merge holds in one tile)."""
    from mmrl_megatron.models.common.decode_attention import decode_attention

    generator = torch.Generator(device="cuda").manual_seed(0)
    kv_heads, groups, width = 2, 8, 128
    for slots, kv_len in ((256, 512), (1, 2048)):
        def normal(*shape):
            return torch.randn(*shape, device="cuda", generator=generator).bfloat16()

        query, new_keys, new_values = normal(slots, kv_heads * groups, width), normal(slots, kv_heads, width), \
            normal(slots, kv_heads, width)
        keys, values = normal(slots, kv_heads, 2 * kv_len, width), normal(slots, kv_heads, 2 * kv_len, width)
        lengths = torch.randint(1, kv_len + 1, (slots,), device="cuda", generator=generator)
        writes = lengths - 1
        rows = torch.arange(slots, device="cuda")
        expected_keys, expected_values = keys.clone(), values.clone()
        expected_keys[rows, :, writes], expected_values[rows, :, writes] = new_keys, new_values
        visible = torch.arange(kv_len, device="cuda")[None, :] < lengths[:, None]
        bias = torch.zeros(visible.shape, device="cuda").masked_fill(~visible, float("-inf"))[:, None, None]
        expected = torch.nn.functional.scaled_dot_product_attention(
            query.view(slots, kv_heads, groups, width), expected_keys[:, :, :kv_len], expected_values[:, :, :kv_len],
            attn_mask=bias.bfloat16(), scale=width ** -0.5).reshape(slots, kv_heads * groups, width)
        mine = decode_attention(query, new_keys, new_values, keys, values, writes, lengths, kv_len, width ** -0.5)
        assert (mine.float() - expected.float()).abs().max() < 2e-2
        assert torch.equal(keys, expected_keys) and torch.equal(values, expected_values)

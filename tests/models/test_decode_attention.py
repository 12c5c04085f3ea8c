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


def _rotation(seed: int, slots: int, width: int):
    """cos/sin [slots, width] of random angles, both halves alike, as rotary embeddings build them."""
    angles = torch.rand(slots, width // 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 6
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def _rotated(x, cos, sin):
    """HF's apply_rotary_pos_emb of x [slots, heads, width] by cos/sin [slots, width]."""
    first, second = x.chunk(2, dim=-1)
    return x * cos[:, None] + torch.cat([-second, first], dim=-1) * sin[:, None]


def _kernel(query, new_keys, new_values, keys, values, writes, lengths, scale, dtype, one_split=False,
            rotation=None):
    """The kernels' output and the cache they wrote into; one_split: a program target this small gives one
    split per (slot, KV head), the path whose programs write the output without the merge."""
    from mmrl_megatron.models.common import decode_attention as kernels
    from mmrl_megatron.models.common.decode_attention import decode_attention

    if one_split:
        kernels.TARGET_PROGRAMS = 1
    keys, values = keys.to(dtype), values.to(dtype)
    out = decode_attention(query.to(dtype), new_keys.to(dtype), new_values.to(dtype), keys, values, writes,
                           lengths, KV_LEN, scale, None if rotation is None else tuple(x.to(dtype) for x in rotation))
    return out, keys, values


@pytest.fixture
def interpreted(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.mark.parametrize("kv_heads,groups,width,value_width,one_split,rotate",
                         [(2, 8, 128, 128, False, True), (2, 8, 128, 128, True, True), (1, 7, 64, 64, False, False),
                          (2, 1, 32, 48, True, False), (2, 2, 8, 8, False, True)],
                         ids=["qwen-3b", "qwen-3b-one-split", "seven-groups", "one-group-wider-values",
                              "narrower-than-a-tile"])
def test_decode_attention_matches_float64_per_slot_attention(interpreted, kv_heads, groups, width, value_width,
                                                             one_split, rotate):
    """Invariant: in fp32 the kernels store the new token's key (rotated, where a rotation is given) and value
    at each running slot's write position (nothing for a slot whose write position lies past its length) and
    equal float64 attention of the (rotated) query over each slot's first `length` positions of that cache
    within 1e-5 (Qwen2.5-VL-3B's 8 query heads per KV head, 7B's 7, one head per KV head with values wider than
    keys, widths under the 16 of a dot tile, as the tests' tiny models have), whatever lies beyond the length,
    with the splits merged or one split per row."""
    query, new_keys, new_values, keys, values, writes, lengths = _inputs(0, kv_heads, groups, width, value_width)
    scale = width ** -0.5
    rotation = _rotation(2, len(LENGTHS), width) if rotate else None
    rotated_query, rotated_keys = (query, new_keys) if rotation is None else (
        _rotated(query, *rotation), _rotated(new_keys, *rotation))
    keys_after = _written(keys, rotated_keys, writes, lengths)
    values_after = _written(values, new_values, writes, lengths)
    expected = _reference(rotated_query, keys_after, values_after, lengths, scale)
    [(mine, cached_keys, cached_values)] = run_on_cpu_ranks(1, _kernel, query, new_keys, new_values, keys, values,
                                                            writes, lengths, scale, torch.float32, one_split,
                                                            rotation)
    assert mine.shape == expected.shape and mine.dtype == torch.float32
    assert (mine.double() - expected).abs().max() < 1e-5
    # the stored keys: exact without a rotation, within fp32 rounding of the float64 rotation with one
    torch.testing.assert_close(cached_keys.double(), keys_after.float().double(), rtol=0,
                               atol=0 if rotation is None else 1e-5, equal_nan=True)
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

    assert split_count(256, 2, 512) == 1
    assert split_count(64, 2, 512) == 4
    assert split_count(1, 2, 4096) == 64
    assert split_count(1, 2, 32768) == 64
    assert split_count(1, 2, 100) == 2


@pytest.mark.gpu
def test_compiled_kernels_match_masked_sdpa_on_gpu():
    """Invariant: compiled on a GPU in bf16, the kernels give what the engine's masked SDPA gave after writing
    the new token's key and value (within 2e-2, bf16 rounding of the output) at the 3B shape: 256 slots of
    ragged lengths up to 512, 2 KV heads of 8 query heads (one split per row: no merge); and one slot alone at
    2,048 cached positions (the 64 splits the merge holds in one tile). Rotated in the kernel, the query and the
    stored key are the rotary kernel's (layer_kernels.rotate_query_key) within one bf16 step."""
    from mmrl_megatron.models.common.decode_attention import decode_attention
    from mmrl_megatron.models.common.layer_kernels import rotate_query_key

    generator = torch.Generator(device="cuda").manual_seed(0)
    kv_heads, groups, width = 2, 8, 128
    for slots, kv_len, rotate in ((256, 512, False), (256, 512, True), (1, 2048, True)):
        def normal(*shape):
            return torch.randn(*shape, device="cuda", generator=generator).bfloat16()

        query, new_keys, new_values = normal(slots, kv_heads * groups, width), normal(slots, kv_heads, width), \
            normal(slots, kv_heads, width)
        keys, values = normal(slots, kv_heads, 2 * kv_len, width), normal(slots, kv_heads, 2 * kv_len, width)
        lengths = torch.randint(1, kv_len + 1, (slots,), device="cuda", generator=generator)
        writes = lengths - 1
        rotation, rotated_query, rotated_keys = None, query, new_keys
        if rotate:
            angles = torch.rand(slots, width // 2, device="cuda", generator=generator) * 6
            rotation = tuple(x.bfloat16() for x in (torch.cat([angles, angles], -1).cos(),
                                                    torch.cat([angles, angles], -1).sin()))
            rotated_query, rotated_keys = rotate_query_key(query, new_keys, *rotation)
        rows = torch.arange(slots, device="cuda")
        expected_keys, expected_values = keys.clone(), values.clone()
        expected_keys[rows, :, writes], expected_values[rows, :, writes] = rotated_keys, new_values
        visible = torch.arange(kv_len, device="cuda")[None, :] < lengths[:, None]
        bias = torch.zeros(visible.shape, device="cuda").masked_fill(~visible, float("-inf"))[:, None, None]
        expected = torch.nn.functional.scaled_dot_product_attention(
            rotated_query.view(slots, kv_heads, groups, width), expected_keys[:, :, :kv_len],
            expected_values[:, :, :kv_len], attn_mask=bias.bfloat16(), scale=width ** -0.5
        ).reshape(slots, kv_heads * groups, width)
        mine = decode_attention(query, new_keys, new_values, keys, values, writes, lengths, kv_len, width ** -0.5,
                                rotation)
        assert (mine.float() - expected.float()).abs().max() < 2e-2
        torch.testing.assert_close(keys, expected_keys, rtol=2 ** -7, atol=1e-6)
        assert torch.equal(values, expected_values)

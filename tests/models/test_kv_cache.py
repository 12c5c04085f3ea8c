"""StaticKVCache's prompt writes: the one-run broadcasting copy equals the indexed write."""
import torch

from mmrl_megatron.models.common.kv_cache import CacheGeometry, PromptSlots, StaticKVCache


def _written(slot_list, samples, keys, values):
    cache = StaticKVCache(CacheGeometry(1, 2, 4, 8, 6, value_dim=3), torch.float32, torch.device("cpu"))
    placement = PromptSlots(slot_list, samples, torch.device("cpu"))
    cache.write_prompts(0, keys, values, placement)
    return placement, cache.keys[0], cache.values[0]


def test_prompt_writes_fill_each_prompts_slots_in_a_run_or_scattered():
    """Invariant: prompt i's keys and values land at positions [0, T) of slots [i * n, (i + 1) * n) of the
    placement's list and nowhere else, whether the slots form one run (the broadcasting copy) or not (the
    indexed write)."""
    generator = torch.Generator().manual_seed(0)
    keys = torch.randn(2, 2, 5, 4, generator=generator)  # 2 prompts, 2 KV heads, 5 tokens
    values = torch.randn(2, 2, 5, 3, generator=generator)
    for slot_list in ([2, 3, 4, 5, 6, 7], [0, 5, 1, 6, 2, 7]):
        placement, cached_keys, cached_values = _written(slot_list, 3, keys, values)
        assert (placement.first is not None) == (slot_list == [2, 3, 4, 5, 6, 7])
        for position, slot in enumerate(slot_list):
            assert torch.equal(cached_keys[slot, :, :5], keys[position // 3])
            assert torch.equal(cached_values[slot, :, :5], values[position // 3])
        untouched = [slot for slot in range(8) if slot not in slot_list]
        assert cached_keys[untouched].abs().sum() == 0 and cached_keys[:, :, 5:].abs().sum() == 0
        assert cached_values[untouched].abs().sum() == 0

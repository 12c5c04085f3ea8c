"""Prefill and decode over a static KV cache, around transformers' own modules.

`CachedDecoder` holds what every family shares: the masks, the cache writes and the attention over
cached keys/values. A family's decoder supplies the layer loop (`_run_layers`) and says what its
attention keeps in the cache (models/<family>/embedded.py hold the families' decoders). The weights,
projections, rotary tables and vision towers are transformers' (or the project's) modules; the attention
around the cache is ours, because HF's cache classes and mask builders allocate and branch per step, which
prevents CUDA-graph capture, and so is the Qwen layer body (decode_layer.py). Numerics follow HF's layers
(the same weights and arithmetic in the same order; decode_layer.py fuses the elementwise steps on GPUs), so
log-probs match a plain HF forward pass.
"""
from typing import Optional

import torch
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import repeat_kv

from .decode_layer import rotated
from .kv_cache import CacheGeometry, PromptSlots, StaticKVCache

# The decode step's attention runs in decode_attention.py's Triton kernels for bf16/fp16 caches on a GPU whose
# keys are at most this wide (Qwen's 128); fp32 keeps SDPA, the exact path the engine's fp32 parity tests
# compare, and so do wider keys (Kimi-VL's 576-wide MLA latent: its padded tiles would not fit the registers).
KERNEL_DTYPES = (torch.bfloat16, torch.float16)
KERNEL_MAX_KEY_WIDTH = 256


def decode_kernel_applies(keys: torch.Tensor) -> bool:
    return keys.is_cuda and keys.dtype in KERNEL_DTYPES and keys.shape[-1] <= KERNEL_MAX_KEY_WIDTH


class CachedDecoder:
    """prefill/decode over a StaticKVCache. Subclasses set `layers` (HF decoder layers whose
    `self_attn.scaling` is the softmax scale), `embed_tokens`, `final_norm`, `lm_head`, the attention
    geometry (`num_heads`, `num_kv_heads`, `key_dim`, `value_dim`), `position_rows` (3 for M-RoPE, 1 for
    1-D positions), and implement `embed_prompts` and `_run_layers`."""

    layers: torch.nn.ModuleList
    num_heads: int
    num_kv_heads: int
    key_dim: int
    value_dim: int
    position_rows: int

    @property
    def query_groups(self) -> int:
        """Query heads per KV head (GQA)."""
        return self.num_heads // self.num_kv_heads

    def cache_geometry(self, slots: int, max_len: int) -> CacheGeometry:
        return CacheGeometry(len(self.layers), self.num_kv_heads, self.key_dim, slots, max_len, self.value_dim)

    def embed_prompts(self, input_ids: torch.Tensor, pixel_values: Optional[torch.Tensor],
                      image_grid_thw: Optional[torch.Tensor]) -> torch.Tensor:
        """Token embeddings [B, T, H] with the vision tower's features written over the image placeholders."""
        raise NotImplementedError

    def _run_layers(self, hidden: torch.Tensor, positions: torch.Tensor, attend) -> torch.Tensor:
        """The decoder layers over hidden [B, L, H] at positions [position_rows, B, L]; the attention core is
        attend(layer_index, query [B, heads, L, key_dim], key [B, kv_heads, L, key_dim],
        value [B, kv_heads, L, value_dim], rotation) -> [B, heads, L, value_dim]; rotation is (cos, sin)
        [B, L, key_dim] when query and key still need rotating (decode_layer.rotated applies it), None when they
        come rotated."""
        raise NotImplementedError

    def prefill(self, embeds: torch.Tensor, positions: torch.Tensor, lengths: torch.Tensor,
                cache: StaticKVCache, placement: PromptSlots) -> torch.Tensor:
        """Run right-padded prompts embeds [B, T, H] (positions [position_rows, B, T], true lengths [B]).

        Writes each prompt's keys/values into its slots (one prompt can fill several slots: its n samples share
        the prefill). Returns logits [B, vocab] at each last token.
        """
        batch, length, _ = embeds.shape
        # Right padding makes the causal mask enough: a real token's earlier keys are all real (the pad rows'
        # outputs, and the keys they leave in the cache beyond the prompt, are never read). Without an explicit
        # mask SDPA takes its flash kernels; with grouped heads and equal key/value widths it reads the KV heads
        # unrepeated (MLA's latent form keeps the repeat).
        grouped = self.key_dim == self.value_dim

        def attend(layer_index: int, query, key, value, rotation):
            query, key = rotated(query, key, rotation)
            cache.write_prompts(layer_index, key, value, placement)
            if not grouped:
                key, value = repeat_kv(key, self.query_groups), repeat_kv(value, self.query_groups)
            return torch.nn.functional.scaled_dot_product_attention(
                query, key, value, is_causal=True, enable_gqa=grouped,
                scale=self.layers[layer_index].self_attn.scaling)

        hidden = self._run_layers(embeds, positions, attend)
        last = hidden[torch.arange(batch, device=hidden.device), lengths - 1]
        return self.lm_head(self.final_norm(last))

    def decode(self, cache: StaticKVCache, batch: int, kv_len: int) -> torch.Tensor:
        """One token for cache slots [0, batch): feeds cache.last_token, appends its keys/values at
        cache.cache_lens, attends over the first kv_len cached positions; returns logits [batch, vocab].
        Reads and writes only fixed storage, so it can be captured as a CUDA graph."""
        tokens = cache.last_token[:batch]
        cache_lens = cache.cache_lens[:batch]
        positions = (cache_lens + cache.rope_deltas[:batch]).view(1, batch, 1).expand(self.position_rows, batch, 1)
        kernel = decode_kernel_applies(cache.keys[0])
        if kernel:
            from .decode_attention import decode_attention  # Triton: present wherever CUDA tensors are

            lengths = (cache_lens + 1).clamp_(max=kv_len)  # the new token's position is attended too
        else:  # the cache writes and the mask of the SDPA path
            slot_index = torch.arange(batch, device=tokens.device)
            visible = (torch.arange(kv_len, device=tokens.device)[None, :] <= cache_lens[:, None])[:, None, None, :]
            attention_bias = additive_mask(visible, cache.keys[0].dtype)

        def attend(layer_index: int, query, key, value, rotation):
            keys = cache.keys[layer_index]
            values = cache.values[layer_index]
            if kernel:  # the kernel also rotates the query and the new key, and writes the new key and value
                output = decode_attention(query[:, :, 0], key[:, :, 0], value[:, :, 0], keys[:batch],
                                          values[:batch], cache_lens, lengths, kv_len,
                                          self.layers[layer_index].self_attn.scaling,
                                          None if rotation is None else tuple(x[:, 0] for x in rotation))
                return output.unsqueeze(2)
            query, key = rotated(query, key, rotation)
            keys[slot_index, :, cache_lens] = key[:, :, 0]
            values[slot_index, :, cache_lens] = value[:, :, 0]
            # Grouped-query attention without repeating the cache: the query heads sharing a KV head act as
            # that head's query rows ([B, kv_heads, groups, D]); one fused kernel, fp32 softmax inside.
            grouped_query = query.reshape(batch, self.num_kv_heads, self.query_groups, self.key_dim)
            output = torch.nn.functional.scaled_dot_product_attention(
                grouped_query, keys[:batch, :, :kv_len], values[:batch, :, :kv_len], attn_mask=attention_bias,
                scale=self.layers[layer_index].self_attn.scaling)
            # some SDPA backends (fp32 on CUDA) return a strided output: reshape, not view
            return output.reshape(batch, self.num_heads, 1, self.value_dim)

        hidden = self._run_layers(self.embed_tokens(tokens).unsqueeze(1), positions, attend)
        return self.lm_head(self.final_norm(hidden[:, 0]))


def additive_mask(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0 where attention is allowed, -inf elsewhere: built once per step, since SDPA would otherwise
    convert a boolean mask again in every layer."""
    return torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill(~visible, float("-inf"))

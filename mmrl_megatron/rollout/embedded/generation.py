"""One generate call as continuous batching over the cache's slots.

Requests wait in order; whenever enough slots are free for all n samples of the next request(s),
their prompts are prefilled together (once per prompt; the n samples copy its keys/values) and join
the running batch. Every decode step advances all running sequences by one token; a sequence that
finishes frees its slot at once, and the next waiting prompt takes it.
"""
from collections import deque
from dataclasses import dataclass
from typing import Callable, Deque, List, Optional, Sequence

import torch

from ...models.common.cached_decoder import CachedDecoder
from ...models.common.kv_cache import StaticKVCache
from ..sampling import counter_uniforms, sample_tokens, sequence_seeds, token_logprobs
from ..types import RolloutResult, SamplingParams
from .prompts import PreparedPrompt, collate_prefill
from .stopping import LENGTH, STOP, StopRules


@dataclass
class _Running:
    request_index: int
    sample_index: int
    cache_len: int  # host mirror of cache.cache_lens[slot]
    response: List[int]  # host copy of the tokens, kept only when stop strings need text


class GenerationRun:
    """Generates n samples for every prompt; `decode(batch, kv_len)` is the (graph-replayed or eager) decode step."""

    def __init__(self, decoder: CachedDecoder, cache: StaticKVCache, decode: Callable[[int, int], torch.Tensor],
                 sampling: SamplingParams, stop_rules: StopRules, seed: int, prefill_tokens: int,
                 pixel_dtype: torch.dtype) -> None:
        self.decoder = decoder
        self.cache = cache
        self.decode = decode
        self.sampling = sampling
        self.stop_rules = stop_rules
        self.seed = seed
        self.prefill_tokens = prefill_tokens
        self.pixel_dtype = pixel_dtype
        slots = cache.geometry.slots
        self.device = cache.last_token.device
        self.out_tokens = torch.zeros(slots, sampling.max_new_tokens, dtype=torch.long, device=self.device)
        self.out_logprobs = torch.zeros(slots, sampling.max_new_tokens, dtype=torch.float32, device=self.device)
        self.out_lens = torch.zeros(slots, dtype=torch.long, device=self.device)
        self.seeds = torch.zeros(slots, dtype=torch.long, device=self.device)
        self.running: List[Optional[_Running]] = [None] * slots
        self.results: List[RolloutResult] = []

    def run(self, prompts: Sequence[PreparedPrompt]) -> List[RolloutResult]:
        waiting: Deque[PreparedPrompt] = deque(prompts)
        while waiting or any(self.running):
            self._admit(waiting)
            if any(self.running):
                self._decode_step()
        return sorted(self.results, key=lambda result: (result.request_index, result.sample_index))

    def _admit(self, waiting: Deque[PreparedPrompt]) -> None:
        """Prefill as many waiting prompts as free slots and the prefill token budget allow."""
        n = self.sampling.n
        free = [slot for slot, sequence in enumerate(self.running) if sequence is None]
        group: List[PreparedPrompt] = []
        longest = 0
        while waiting and len(free) >= n * (len(group) + 1):
            candidate_longest = max(longest, waiting[0].length)
            if group and candidate_longest * (len(group) + 1) > self.prefill_tokens:
                break
            longest = candidate_longest
            group.append(waiting.popleft())
        if not group:
            return
        batch = collate_prefill(group, self.device, self.pixel_dtype)
        slot_list = free[:n * len(group)]
        slots = torch.tensor(slot_list, device=self.device)
        rows = torch.arange(len(group), device=self.device).repeat_interleave(n)
        embeds = self.decoder.embed_prompts(batch.input_ids, batch.pixel_values, batch.image_grid_thw)
        logits = self.decoder.prefill(embeds, batch.positions, batch.lengths, self.cache, slots, rows)
        deltas = torch.tensor([prompt.rope_delta for prompt in group], device=self.device)
        self.cache.cache_lens[slots] = batch.lengths[rows]
        self.cache.rope_deltas[slots] = deltas[rows]
        request_indices = torch.tensor([prompt.request_index for prompt in group], device=self.device)[rows]
        sample_indices = torch.arange(n, device=self.device).repeat(len(group))
        self.seeds[slots] = sequence_seeds(self.seed, request_indices, sample_indices)
        self.out_lens[slots] = 0
        for position, slot in enumerate(slot_list):
            prompt = group[position // n]
            self.running[slot] = _Running(prompt.request_index, position % n, prompt.length, [])
        self._accept(slot_list, slots, logits[rows])

    def _decode_step(self) -> None:
        active = [slot for slot, sequence in enumerate(self.running) if sequence is not None]
        kv_len = max(self.running[slot].cache_len for slot in active) + 1
        logits = self.decode(active[-1] + 1, kv_len)
        slots = torch.tensor(active, device=self.device)
        self.cache.cache_lens[slots] += 1
        for slot in active:
            self.running[slot].cache_len += 1
        self._accept(active, slots, logits[slots])

    def _accept(self, slot_list: List[int], slots: torch.Tensor, logits: torch.Tensor) -> None:
        """Sample one token per slot from its logits, record it, and retire the sequences that ended."""
        params = self.sampling
        counters = self.out_lens[slots]
        tokens = sample_tokens(logits, params.temperature, params.top_p, params.top_k,
                               counter_uniforms(self.seeds[slots], counters))
        self.out_tokens[slots, counters] = tokens
        self.out_logprobs[slots, counters] = token_logprobs(logits, tokens, params.temperature)
        self.out_lens[slots] = counters + 1
        self.cache.last_token[slots] = tokens
        stop_flags, length_flags = torch.stack(
            [self.stop_rules.token_stops(tokens), counters + 1 >= params.max_new_tokens]).tolist()
        if self.stop_rules.uses_strings:
            for slot, token in zip(slot_list, tokens.tolist()):
                self.running[slot].response.append(token)
            string_flags = [self.stop_rules.string_stops(self.running[slot].response) for slot in slot_list]
        else:
            string_flags = [False] * len(slot_list)
        # One small device-to-host copy per step (the flags), then plain list scans: at 256 sequences the
        # host work stays well below a GPU decode step.
        finished = [(slot, STOP if stop_token or stop_string else LENGTH)
                    for slot, stop_token, stop_string, full in zip(slot_list, stop_flags, string_flags, length_flags)
                    if stop_token or stop_string or full]
        if finished:
            self._retire(finished)

    def _retire(self, finished: List[tuple]) -> None:
        slots = torch.tensor([slot for slot, _ in finished], device=self.device)
        lengths = self.out_lens[slots].tolist()
        tokens = self.out_tokens[slots].tolist()
        logprobs = self.out_logprobs[slots].tolist()
        for row, (slot, reason) in enumerate(finished):
            sequence = self.running[slot]
            self.results.append(RolloutResult(sequence.request_index, sequence.sample_index,
                                              tokens[row][:lengths[row]], logprobs[row][:lengths[row]], reason))
            self.running[slot] = None
        self.cache.cache_lens[slots] = 0

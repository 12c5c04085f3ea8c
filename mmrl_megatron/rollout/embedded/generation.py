"""One generate call as continuous batching over the cache's slots.

Requests wait in order; whenever enough slots are free for all n samples of the next request(s),
their prompts are prefilled together (once per prompt; the n samples copy its keys/values) and join
the running batch. Every decode step advances all running sequences by one token; a sequence that
finishes frees its slot at once, and the next waiting prompt takes it. With continuous batching off
(static batches, the baseline the benchmark compares with, as Hugging Face generate batches) prompts fill
an empty cache, and the batch is decoded at its full width, padded to its longest response, before the
next is admitted.
"""
from collections import deque
from dataclasses import dataclass
from typing import Callable, Deque, List, Optional, Sequence

import torch

from ...models.common.cached_decoder import CachedDecoder
from ...models.common.kv_cache import StaticKVCache
from ..sampling import sequence_seeds
from ..types import RolloutResult, SamplingParams
from .graphs import batch_bucket
from .prompts import PreparedPrompt, collate_prefill
from .slot_sampler import SlotSampler
from .stopping import LENGTH, STOP, StopRules


@dataclass
class _Running:
    request_index: int
    sample_index: int
    cache_len: int  # host mirror of cache.cache_lens[slot]
    response: List[int]  # host copy of the tokens, kept only when stop strings need text


class GenerationRun:
    """Generates n samples for every prompt. `step(batch, kv_len)` is one decode step with its draw over slots
    [0, batch) (graph-replayed or eager: SlotSampler.decode_step); `sampler` holds the slots' sampling state."""

    def __init__(self, decoder: CachedDecoder, cache: StaticKVCache, sampler: SlotSampler,
                 step: Callable[[int, int], None], sampling: SamplingParams, budgets: Sequence[int],
                 stop_rules: StopRules, seed: int, prefill_tokens: int, pixel_dtype: torch.dtype,
                 continuous: bool = True) -> None:
        self.decoder = decoder
        self.cache = cache
        self.sampler = sampler
        self.step = step
        self.sampling = sampling
        self.budgets = budgets  # per request: its max_new_tokens
        self.stop_rules = stop_rules
        self.seed = seed
        self.prefill_tokens = prefill_tokens
        self.pixel_dtype = pixel_dtype
        self.continuous = continuous  # False: a batch is admitted only once the previous one has finished
        self.device = cache.last_token.device
        self.running: List[Optional[_Running]] = [None] * cache.geometry.slots
        self.static_width = 0  # static batches: the slots the current batch was admitted into
        self.results: List[RolloutResult] = []

    def run(self, prompts: Sequence[PreparedPrompt]) -> List[RolloutResult]:
        waiting: Deque[PreparedPrompt] = deque(prompts)
        while waiting or any(self.running):
            self._admit(waiting)
            if any(self.running):
                self._decode_step()
        return sorted(self.results, key=lambda result: (result.request_index, result.sample_index))

    def _admit(self, waiting: Deque[PreparedPrompt]) -> None:
        if self.continuous:
            self._admit_group(waiting)
        elif not any(self.running):
            # the cache is empty, so the batch takes slots [0, static_width) group by group
            self.static_width = 0
            while waiting and (admitted := self._admit_group(waiting)):
                self.static_width += admitted

    def _admit_group(self, waiting: Deque[PreparedPrompt]) -> int:
        """Prefill as many waiting prompts as free slots and the prefill token budget allow, into the lowest free
        slots; returns how many slots they took."""
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
            return 0
        batch = collate_prefill(group, self.device, self.pixel_dtype)
        slot_list = free[:n * len(group)]
        slots = torch.tensor(slot_list, device=self.device)
        rows = torch.arange(len(group), device=self.device).repeat_interleave(n)
        embeds = self.decoder.embed_prompts(batch.input_ids, batch.pixel_values, batch.image_grid_thw)
        logits = self.decoder.prefill(embeds, batch.positions, batch.lengths, self.cache, slots, rows)
        per_prompt = torch.tensor([[prompt.rope_delta, prompt.request_index, self.budgets[prompt.request_index]]
                                   for prompt in group], device=self.device)[rows]
        self.cache.cache_lens[slots] = batch.lengths[rows]
        self.cache.rope_deltas[slots] = per_prompt[:, 0]
        sample_indices = torch.arange(n, device=self.device).repeat(len(group))
        sampler = self.sampler
        sampler.seeds[slots] = sequence_seeds(self.seed, per_prompt[:, 1], sample_indices)
        sampler.budgets[slots] = per_prompt[:, 2]
        sampler.counters[slots] = 0
        sampler.active[slots] = True
        for position, slot in enumerate(slot_list):
            prompt = group[position // n]
            self.running[slot] = _Running(prompt.request_index, position % n, prompt.length, [])
        sampler.accept(logits[rows], slots, self.sampling, self.cache)
        self._check_finished(slot_list, slots)
        return len(slot_list)

    def _decode_step(self) -> None:
        active = [slot for slot, sequence in enumerate(self.running) if sequence is not None]
        if self.continuous:
            active = self._compacted(active)
            batch = active[-1] + 1
        else:  # padded: finished sequences keep their rows in the step until the batch's longest ends
            batch = self.static_width
        kv_len = max(self.running[slot].cache_len for slot in active) + 1
        self.step(batch, kv_len)
        for slot in active:
            self.running[slot].cache_len += 1
        self._check_finished(active, torch.tensor(active, device=self.device))

    def _compacted(self, active: List[int]) -> List[int]:
        """The running slots, moved down to [0, len(active)) when that shrinks the step's batch bucket.

        A step covers slots [0, highest running + 1): without moving, one long response left in a high slot
        keeps every step of a long-tailed batch at full width (on an H200, 3B, the tail of an RL-shaped call
        ran at the 256-slot step cost with a handful of sequences running)."""
        slots = self.cache.geometry.slots
        if batch_bucket(active[-1] + 1, slots) <= batch_bucket(len(active), slots):
            return active
        targets = [slot for slot in range(len(active)) if self.running[slot] is None]
        sources = [slot for slot in active if slot >= len(active)]
        source_index, target_index = (torch.tensor(slots_, device=self.device) for slots_ in (sources, targets))
        self.cache.move_slots(source_index, target_index)
        self.sampler.move_slots(source_index, target_index)
        for source, target in zip(sources, targets):
            self.running[target], self.running[source] = self.running[source], None
        return list(range(len(active)))

    def _check_finished(self, slot_list: List[int], slots: torch.Tensor) -> None:
        """Retire the sequences in slot_list (`slots` on the device) that their last sampled token ended."""
        tokens = self.cache.last_token[slots]
        full = self.sampler.counters[slots] >= self.sampler.budgets[slots]
        # One small device-to-host copy per step (the flags), then plain list scans: at 256 sequences the
        # host work stays well below a GPU decode step.
        stop_flags, length_flags = torch.stack([self.stop_rules.token_stops(tokens), full]).tolist()
        if self.stop_rules.uses_strings:
            for slot, token in zip(slot_list, tokens.tolist()):
                self.running[slot].response.append(token)
            string_flags = [self.stop_rules.string_stops(self.running[slot].response) for slot in slot_list]
        else:
            string_flags = [False] * len(slot_list)
        finished = [(slot, STOP if stop_token or stop_string else LENGTH)
                    for slot, stop_token, stop_string, full in zip(slot_list, stop_flags, string_flags, length_flags)
                    if stop_token or stop_string or full]
        if finished:
            self._retire(finished)

    def _retire(self, finished: List[tuple]) -> None:
        slots = torch.tensor([slot for slot, _ in finished], device=self.device)
        sampler = self.sampler
        lengths = sampler.counters[slots].tolist()
        tokens = sampler.tokens[slots].tolist()
        logprobs = sampler.logprobs[slots].tolist()
        for row, (slot, reason) in enumerate(finished):
            sequence = self.running[slot]
            self.results.append(RolloutResult(sequence.request_index, sequence.sample_index,
                                              tokens[row][:lengths[row]], logprobs[row][:lengths[row]], reason))
            self.running[slot] = None
        self.cache.cache_lens[slots] = 0
        sampler.counters[slots] = 0
        sampler.active[slots] = False

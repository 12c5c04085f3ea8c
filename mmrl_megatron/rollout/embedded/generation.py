"""One generate call as continuous batching over the cache's slots.

Requests wait in order; whenever enough slots are free for all n samples of the next few requests
(admission_prompts of them, or all that wait), their prompts are prefilled together (once per prompt; the n
samples copy its keys/values) and join the running batch; an empty cache takes every group that fits before
its first step, since no decoding waits on them. Every decode step advances all running sequences by
one token; a sequence that finishes frees its slot at once for the next admission. With continuous batching off
(static batches, the baseline the benchmark compares with, as Hugging Face generate batches) prompts fill
an empty cache, and the batch is decoded at its full width, padded to its longest response, before the
next is admitted.

While a decode step runs on the GPU, the host prepares the next: it launches step t + 1 over the same slots
before reading which sequences step t finished, unless one reaches its token budget at step t (known on the
host) or stop strings need step t's tokens on the host. A sequence that a stop token ended at step t is no
longer active when step t + 1 runs (SlotSampler.finish, queued behind step t), so step t + 1 leaves it as it
was; once the host has retired it, nothing is in flight and admission and slot moves proceed. Without this
overlap the GPU idled for the host's bookkeeping between every two steps.

The host's phases are torch.profiler ranges (rollout.admit, rollout.decode_step, rollout.retire): a profile
attributes the GPU's idle time to them (benchmarks/common.profile_summary).
"""
import functools
from collections import deque
from dataclasses import dataclass
from typing import Callable, Deque, List, Optional, Sequence

import torch
from torch.profiler import record_function

from ...models.common.cached_decoder import CachedDecoder
from ...models.common.kv_cache import PromptSlots, StaticKVCache
from ...models.common.transfer import to_device, to_host
from ..sampling import sequence_seeds
from ..types import RolloutResult, SamplingParams
from .graphs import batch_bucket
from .prompts import PreparedPrompt, collate_prefill
from .slot_sampler import ENDED_BY_BUDGET, RUNNING, SlotSampler
from .stopping import LENGTH, STOP, StopRules


def _profiled(name: str) -> Callable[[Callable], Callable]:
    """The method inside a torch.profiler range `name`, a fresh one per call (a decorating record_function is one
    object shared by every call, in every thread)."""
    def wrap(method: Callable) -> Callable:
        @functools.wraps(method)
        def run(*args, **kwargs):
            with record_function(name):
                return method(*args, **kwargs)
        return run
    return wrap


@dataclass
class _Running:
    request_index: int
    sample_index: int
    cache_len: int  # host mirror of cache.cache_lens[slot]
    remaining: int  # tokens still to sample before its budget ends it (host mirror)
    response: List[int]  # host copy of the tokens, kept only when stop strings need text


@dataclass
class _Finishes:
    """What a launched step (or an admission's first draw) did to `slots`: SlotSampler.finish's codes on their
    way to the host (`codes`, transfer.to_host), slots[i]'s at codes()[rows[i]]."""
    slots: List[int]
    codes: Callable[[], List[int]]
    rows: Sequence[int]


class GenerationRun:
    """Generates n samples for every prompt. `step(batch, kv_len)` is one decode step with its draw over slots
    [0, batch) (graph-replayed or eager: SlotSampler.decode_step); `sampler` holds the slots' sampling state."""

    def __init__(self, decoder: CachedDecoder, cache: StaticKVCache, sampler: SlotSampler,
                 step: Callable[[int, int], None], sampling: SamplingParams, budgets: Sequence[int],
                 stop_rules: StopRules, seed: int, prefill_tokens: int, pixel_dtype: torch.dtype,
                 continuous: bool, admission_prompts: int) -> None:
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
        self.admission_prompts = admission_prompts  # continuous: prompts an admission waits to have room for
        self.device = cache.last_token.device
        self.running: List[Optional[_Running]] = [None] * cache.geometry.slots
        self.static_width = 0  # static batches: the slots the current batch was admitted into
        self.results: List[RolloutResult] = []

    def run(self, prompts: Sequence[PreparedPrompt]) -> List[RolloutResult]:
        """Every prompt's n results, ordered by (request_index, sample_index)."""
        waiting: Deque[PreparedPrompt] = deque(prompts)
        in_flight: Optional[_Finishes] = None
        while waiting or any(self.running):
            if in_flight is None:
                self._admit(waiting)
                if not any(self.running):
                    continue
                in_flight = self._launch_step(move_slots=True)
            following = self._launch_step(move_slots=False) if self._may_overlap(waiting) else None
            if self._retire_finished(in_flight) and following is not None:
                self._retire_finished(following)  # drain: admission and slot moves need nothing in flight
                following = None
            in_flight = following
        return sorted(self.results, key=lambda result: (result.request_index, result.sample_index))

    def _may_overlap(self, waiting: Deque[PreparedPrompt]) -> bool:
        """Whether the next step may be launched before the host learns what the one in flight finished: no
        running sequence ends by its budget there, no stop string needs its tokens on the host, and no waiting
        prompt could be admitted now (admission comes first)."""
        if self.stop_rules.uses_strings or (self.continuous and self._admission_due(waiting)):
            return False
        return all(sequence.remaining > 0 for sequence in self.running if sequence is not None)

    def _admission_due(self, waiting: Deque[PreparedPrompt]) -> bool:
        """Continuous batching: whether free slots take admission_prompts waiting prompts (fewer when fewer
        wait, and never more than half the prompts the cache holds: waiting for a whole cache would be static
        batching; so an empty cache always admits). A prefill's cost hardly grows over its first few prompts
        (it is host work and launches), and every admission pauses decoding: on an H200 (3B, the RL-shaped
        benchmark) 13 admissions, most of one prompt, took 1.34 s of an 11.6 s call; grouped by four, 6 took
        0.73 s, and the steps the waiting prompts lost did not lengthen the call."""
        if not waiting:
            return False
        n = self.sampling.n
        fitting = sum(sequence is None for sequence in self.running) // n
        return fitting >= min(len(waiting), self.admission_prompts, max(1, len(self.running) // n // 2))

    def _admit(self, waiting: Deque[PreparedPrompt]) -> None:
        """Admit waiting prompts as the batching mode allows. The groups admitted together are all queued before
        their first draws' finishes are read, so the host prepares a group while the GPU runs the one before."""
        admitted: List[_Finishes] = []
        if self.continuous:
            # while nothing decodes, an admission pauses nothing: the cache takes every group that fits before
            # its first step (one group per step after that)
            starting = not any(self.running)
            while self._admission_due(waiting):
                admitted.append(self._admit_group(waiting))
                if not starting:
                    break
        elif not any(self.running):
            # the cache is empty, so the batch takes slots [0, static_width) group by group
            self.static_width = 0
            while waiting and (group := self._admit_group(waiting)) is not None:
                self.static_width += len(group.slots)
                admitted.append(group)
        for finishes in admitted:
            self._retire_finished(finishes)

    @_profiled("rollout.admit")
    def _admit_group(self, waiting: Deque[PreparedPrompt]) -> Optional[_Finishes]:
        """Prefill as many waiting prompts as free slots and the prefill token budget allow, into the lowest free
        slots, and draw their first tokens; returns those draws' finishes (None when no prompt fits)."""
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
            return None
        batch = collate_prefill(group, self.device, self.pixel_dtype)
        slot_list = free[:n * len(group)]
        placement = PromptSlots(slot_list, n, self.device)
        slots, rows = placement.slots, placement.rows
        per_prompt = to_device(torch.tensor([[prompt.rope_delta, prompt.request_index,
                                              self.budgets[prompt.request_index]] for prompt in group]),
                               self.device)[rows]
        embeds = self.decoder.embed_prompts(batch.input_ids, batch.pixel_values, batch.image_grid_thw)
        logits = self.decoder.prefill(embeds, batch.positions, batch.lengths, self.cache, placement)
        self.cache.cache_lens[slots] = batch.lengths[rows]
        self.cache.rope_deltas[slots] = per_prompt[:, 0]
        sample_indices = torch.arange(n, device=self.device).repeat(len(group))
        sampler = self.sampler
        sampler.seeds[slots] = sequence_seeds(self.seed, per_prompt[:, 1], sample_indices)
        sampler.budgets[slots] = per_prompt[:, 2]
        # index_fill_, not `[slots] = 0`: a scalar set by indexing is copied to the GPU with a stream synchronisation
        sampler.counters.index_fill_(0, slots, 0)
        sampler.active.index_fill_(0, slots, True)
        for position, slot in enumerate(slot_list):
            prompt = group[position // n]
            budget = self.budgets[prompt.request_index]
            self.running[slot] = _Running(prompt.request_index, position % n, prompt.length, budget - 1, [])
        sampler.accept(logits[rows], slots, self.sampling, self.cache)
        codes = to_host(sampler.finish(slots, self.stop_rules, self.cache))
        return _Finishes(slot_list, codes, range(len(slot_list)))

    @_profiled("rollout.decode_step")
    def _launch_step(self, move_slots: bool) -> _Finishes:
        """Queue one decode step over the running sequences (moved down first if `move_slots`, which needs
        nothing in flight) and the copy of its finish flags to the host; returns without waiting for either."""
        active = [slot for slot, sequence in enumerate(self.running) if sequence is not None]
        if self.continuous:
            active = self._compacted(active) if move_slots else active
            batch = active[-1] + 1
        else:  # padded: finished sequences keep their rows in the step until the batch's longest ends
            batch = self.static_width
        kv_len = max(self.running[slot].cache_len for slot in active) + 1
        self.step(batch, kv_len)
        for slot in active:
            sequence = self.running[slot]
            sequence.cache_len += 1
            sequence.remaining -= 1
        codes = to_host(self.sampler.finish(slice(0, batch), self.stop_rules, self.cache))
        return _Finishes(active, codes, active)  # the step's rows are its slots

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

    @_profiled("rollout.retire")
    def _retire_finished(self, finishes: _Finishes) -> bool:
        """Retire the sequences `finishes` reports ended (waiting for its flags) and those a stop string ended;
        returns whether any was retired."""
        slot_list = finishes.slots
        codes = finishes.codes()
        codes = [codes[row] for row in finishes.rows]
        string_flags = [False] * len(slot_list)
        if self.stop_rules.uses_strings:  # no step is in flight beyond this one's (_may_overlap)
            slots = torch.tensor(slot_list, device=self.device)
            for slot, token in zip(slot_list, self.cache.last_token[slots].tolist()):
                self.running[slot].response.append(token)
            string_flags = [self.stop_rules.string_stops(self.running[slot].response) for slot in slot_list]
        finished = [(slot, LENGTH if code == ENDED_BY_BUDGET and not stop_string else STOP)
                    for slot, code, stop_string in zip(slot_list, codes, string_flags)
                    if code != RUNNING or stop_string]
        if finished:
            self._retire(finished)
        return bool(finished)

    def _retire(self, finished: List[tuple]) -> None:
        slots = torch.tensor([slot for slot, _ in finished], device=self.device)
        sampler = self.sampler
        lengths = sampler.counters[slots].tolist()
        # only the columns the longest response used: the rows are the cache's length wide (the 3B text
        # benchmark's 256 rows of 512 columns took 34 ms to turn into lists on the CI machine, 16 ms cut to 256)
        width = max(lengths)
        tokens = sampler.tokens[slots, :width].tolist()
        logprobs = sampler.logprobs[slots, :width].tolist()
        for row, (slot, reason) in enumerate(finished):
            sequence = self.running[slot]
            self.results.append(RolloutResult(sequence.request_index, sequence.sample_index,
                                              tokens[row][:lengths[row]], logprobs[row][:lengths[row]], reason))
            self.running[slot] = None
        self.cache.cache_lens.index_fill_(0, slots, 0)
        sampler.counters.index_fill_(0, slots, 0)
        sampler.active.index_fill_(0, slots, False)

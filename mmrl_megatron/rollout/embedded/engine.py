"""The embedded rollout engine: a model family's transformers (and project) modules driven by our own
batched decode loop (family.py says which family serves a checkpoint)."""
import random
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch
from torch.profiler import record_function

from ...config.schema import EmbeddedEngineConfig
from ...models.common.embedded import eos_ids
from ...models.common.kv_cache import StaticKVCache
from ...models.errors import ModelError
from ...models.family import family_for
from ...models.hf_config import read_hf_config
from ..engine import NamedTensors, RolloutEngine
from ..errors import RolloutError
from ..types import RolloutRequest, RolloutResult, SamplingParams
from .generation import GenerationRun
from .graphs import DecodeGraphs
from .slot_sampler import SlotSampler
from .stopping import StopRules
from .weights import copy_into_weight, iter_checkpoint_buckets

CACHE_LEN_GRANULARITY = 128  # the cache grows in steps of this many tokens, so similar calls reuse it


class EmbeddedEngine(RolloutEngine):
    """Generates on `device` in `dtype` with up to `max_batch_size` sequences in flight.

    Weights arrive only through update_weights (HF checkpoint names); `load_checkpoint()` pushes
    hf_dir's own safetensors through the same path for standalone use.
    """

    def __init__(self, hf_dir: str, device: torch.device, dtype: torch.dtype = torch.bfloat16,
                 max_batch_size: int = 256, settings: Optional[EmbeddedEngineConfig] = None) -> None:
        self.hf_dir = hf_dir
        self.device = torch.device(device)
        self.dtype = dtype
        self.max_batch_size = max_batch_size
        self.settings = settings or EmbeddedEngineConfig()
        try:
            hf_config = read_hf_config(hf_dir)
            self.family = family_for(hf_config).embedded_engine(hf_dir, hf_config, self.device, dtype)
        except ModelError as error:
            raise RolloutError(f"{error}; the embedded engine runs the model families of models/ (use "
                               "rollout.backend=sglang for other models)") from error
        self.model = self.family.module
        self.decoder = self.family.decoder
        self._weights_loaded = False
        self._weights_offloaded = False
        self._cache: Optional[StaticKVCache] = None
        self._sampler: Optional[SlotSampler] = None
        self._graphs: Dict[tuple, DecodeGraphs] = {}  # per sampling setting (its constants are in the graphs)
        self._tokenizer = None
        self._end_of_sequence_ids = self._read_end_of_sequence_ids()

    # -- weights ---------------------------------------------------------------------------------

    def update_weights(self, buckets: Iterable[NamedTensors]) -> None:
        """Copy tensors in place (also while offloaded: they land in the CPU copies and travel back on resume)."""
        with torch.no_grad():
            for bucket in buckets:
                for name, tensor in bucket:
                    copy_into_weight(self.family.weight, name, tensor)
        self._weights_loaded = True

    def get_weights(self, names: Sequence[str]) -> Dict[str, torch.Tensor]:
        weights = {}
        for name in names:
            tensor = self.family.weight(name)
            if tensor is None:
                raise RolloutError(f"engine has no tensor named {name!r} (expected a Hugging Face checkpoint name)")
            weights[name] = tensor.detach().to("cpu", copy=True)
        return weights

    def load_checkpoint(self, bucket_bytes: int = 1 << 30) -> None:
        """Fill the weights from hf_dir's safetensors (standalone use; training syncs through the bridge)."""
        self.update_weights(iter_checkpoint_buckets(self.hf_dir, bucket_bytes))

    # -- memory ----------------------------------------------------------------------------------

    def release_memory(self) -> None:
        """Free the KV cache and decode graphs; with settings.offload_weights also move weights to CPU."""
        self._cache = self._sampler = None
        self._graphs = {}
        if self.settings.offload_weights and self.device.type == "cuda" and not self._weights_offloaded:
            self.model.to("cpu")
            for parameter in self.model.parameters():  # pinned pages copy back about twice as fast
                parameter.data = parameter.data.pin_memory()
            self._weights_offloaded = True
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def resume_memory(self) -> None:
        """Bring offloaded weights back; the cache is re-allocated by the next generate."""
        if self._weights_offloaded:
            self.model.to(self.device, non_blocking=True)
            torch.cuda.synchronize(self.device)
            self._weights_offloaded = False

    def shutdown(self) -> None:
        self.release_memory()

    # -- generation ------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, requests: Sequence[RolloutRequest], sampling: SamplingParams) -> List[RolloutResult]:
        """n results per request, ordered by (request_index, sample_index).

        Semantics (shared with the SGLang backend where it has them): a stop token, the model's eos ids
        (unless ignore_eos) or the token completing a stop string ends a sequence and is kept in the
        response (finish_reason "stop"); max_new_tokens gives "length". Log-probs are of the sampled
        tokens under log_softmax(logits / temperature), unfiltered by top-k/top-p; greedy uses T = 1.
        A seed fixes every sample: sample s of request r depends only on (seed, r, s) and the weights.
        """
        self._check_generate(requests, sampling)
        if not requests:
            return []
        try:
            with record_function("rollout.prepare_prompts"):  # a profiler range, as generation.py's phases
                prompts = [self.family.prepare_prompt(request, index) for index, request in enumerate(requests)]
        except ModelError as error:
            raise RolloutError(str(error)) from error
        budgets = [sampling.max_new_tokens if request.max_new_tokens is None else request.max_new_tokens
                   for request in requests]
        longest = max(prompt.length + budget for prompt, budget in zip(prompts, budgets))
        cache = self._cache_for(len(requests) * sampling.n, longest)
        stop_ids = list(sampling.stop_token_ids) + ([] if sampling.ignore_eos else self._end_of_sequence_ids)
        stop_rules = StopRules(stop_ids, sampling.stop, self.device, self._decode_text if sampling.stop else None)
        seed = sampling.seed if sampling.seed is not None else random.SystemRandom().randrange(1 << 32)
        run = GenerationRun(self.decoder, cache, self._sampler, self._decode_step(cache, sampling), sampling, budgets,
                            stop_rules, seed, self.settings.prefill_tokens, self.family.pixel_dtype,
                            self.settings.continuous_batching, self.settings.admission_prompts)
        return run.run(prompts)

    def _check_generate(self, requests: Sequence[RolloutRequest], sampling: SamplingParams) -> None:
        self._require_resident("generate")
        if not self._weights_loaded:
            raise RolloutError("generate called before any weights arrived: call update_weights (through the "
                               "bridge) or load_checkpoint() first")
        too_small = [index for index, request in enumerate(requests)
                     if request.max_new_tokens is not None and request.max_new_tokens < 1]
        if too_small:
            raise RolloutError(f"request {too_small[0]}: max_new_tokens must be at least 1, got "
                               f"{requests[too_small[0]].max_new_tokens}")
        if not 1 <= sampling.n <= self.max_batch_size:
            raise RolloutError(f"sampling n={sampling.n} must be between 1 and rollout.max_batch_size "
                               f"({self.max_batch_size}): all samples of a prompt decode together")
        if sampling.max_new_tokens < 1:
            raise RolloutError(f"max_new_tokens must be at least 1, got {sampling.max_new_tokens}")

    def _require_resident(self, action: str) -> None:
        if self._weights_offloaded:
            raise RolloutError(f"{action} called while the engine's weights are offloaded: call resume_memory() first")

    def _cache_for(self, sequences: int, tokens_per_sequence: int) -> StaticKVCache:
        """The current cache if it is big enough, else a new one; graphs follow the cache.

        Slots: the call's sequences rounded up to a power of two, at most max_batch_size, so a small
        call (or a CPU run) does not pay for a full-size cache; RL steps repeat one size and reuse it."""
        max_len = max(self.settings.cache_tokens,
                      -(-tokens_per_sequence // CACHE_LEN_GRANULARITY) * CACHE_LEN_GRANULARITY)
        slots = min(self.max_batch_size, 1 << max(sequences - 1, 0).bit_length())
        geometry = self.decoder.cache_geometry(slots, max_len)
        if self._cache is None or not self._cache.fits(geometry):
            # drop the old cache (and the graphs that point into it) before allocating its successor
            self._cache = self._sampler = None
            self._graphs = {}
            self._cache = StaticKVCache(geometry, self.dtype, self.device)
            self._sampler = SlotSampler(geometry.slots, geometry.max_len, self.device)
        return self._cache

    def _decode_step(self, cache: StaticKVCache, sampling: SamplingParams) -> Callable[[int, int], None]:
        """step(batch, kv_len): one decode step with its draw, replayed from CUDA graphs where they apply."""
        sampler, decoder = self._sampler, self.decoder

        def eager(batch: int, kv_len: int) -> None:
            sampler.decode_step(decoder, cache, sampling, batch, kv_len)

        if self.device.type != "cuda" or not self.settings.cuda_graphs or not self.family.cuda_graphs:
            return eager
        key = (sampling.temperature, sampling.top_p, sampling.top_k)
        if key not in self._graphs:
            self._graphs[key] = DecodeGraphs(eager, cache.geometry.slots, cache.geometry.max_len)
        return self._graphs[key]

    def _read_end_of_sequence_ids(self) -> List[int]:
        """eos ids from config.json's text config and generation_config.json, as HF generate uses them."""
        from transformers import GenerationConfig

        ids = list(self.family.end_of_sequence_ids)
        try:
            ids.extend(eos_ids(GenerationConfig.from_pretrained(self.hf_dir).eos_token_id))
        except OSError:
            pass  # no generation_config.json: config.json's ids are all there is
        return sorted(set(ids))

    def _decode_text(self, token_ids: List[int]) -> str:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.hf_dir)
        return self._tokenizer.decode(token_ids, skip_special_tokens=False)

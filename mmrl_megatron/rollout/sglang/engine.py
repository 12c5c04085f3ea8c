"""SGLangEngine: the RolloutEngine that generates with SGLang servers over HTTP.

Every method is collective over the caller's rollout group (group.py): the group's leader owns the
server (launched here, or one of rollout.sglang.urls) and does all HTTP; members send it their
inputs and get their results back. Failure handling lives on the leader:
- a request that times out is retried with backoff (client.py);
- a server that stops answering is restarted, re-synced with the last synced weights, and only the
  requests that had not completed are sent again; after rollout.sglang.max_restarts restarts the
  run stops with the tail of the server log in the error.
Re-syncing needs the weights again: update_weights takes a list (reused as is) or a WeightStream
(the bridge's: its again() re-exports the actor's current weights); after a one-shot iterator a
restart fails with a message saying so.

Request ids are unique per engine, call, pass and sample (and per retry, client.py): SGLang refuses
an id already in flight, and groups may share one server.
"""
import dataclasses
import itertools
import logging
import uuid
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch

from ...config.schema import RolloutConfig
from ..engine import NamedTensors, RolloutEngine, WeightStream
from ..errors import RolloutError
from ..sampling import sequence_seeds
from ..types import RolloutRequest, RolloutResult, SamplingParams
from .checkpoint_names import CheckpointNames
from .client import ServerUnreachable, SGLangClient
from .group import RolloutGroup
from .launcher import ServerProcess
from .payloads import generate_payload, parse_generate_answer
from .serialization import serialize_bucket, split_by_dtype
from .weight_push import DistributedPush, TensorPush, begin_session, end_session

logger = logging.getLogger(__name__)

ENGINE_MEMORY_TAGS_AFTER_WEIGHTS = ["kv_cache", "cuda_graph"]


def _resync_source(buckets: Iterable[NamedTensors]) -> Optional[Callable[[], Iterable[NamedTensors]]]:
    """How to get these weights again after a restart: a WeightStream's again(), a container itself;
    None for a one-shot iterator, which a second pass would find empty."""
    if isinstance(buckets, WeightStream):
        return buckets.again
    if iter(buckets) is not buckets:
        return lambda: buckets
    return None


class SGLangEngine(RolloutEngine):
    # 0.5.23's Qwen2_5_VLForConditionalGeneration and KimiVLForConditionalGeneration have no
    # get_weights_by_name (the route answers HTTP 400); names and shapes are checked before sending
    reads_weights_by_name = False

    def __init__(self, rollout_config: RolloutConfig, hf_dir: str, device: Optional[torch.device] = None,
                 log_dir: Optional[str] = None, launcher=None):
        """launcher: an object with start() -> url, alive(), log_tail(), stop(); default: a ServerProcess."""
        self.config = rollout_config.sglang
        self.hf_dir = hf_dir
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.group = RolloutGroup(self.config.tensor_parallel, self.device)
        self.checkpoint = CheckpointNames(hf_dir)
        if self.config.weight_sync == "tensor":
            self.push = TensorPush(self.config.tensor_parallel)
        else:
            self.push = DistributedPush(self.config, self.device)
        self.launcher = None
        self.client: Optional[SGLangClient] = None
        self.weight_version = 0
        self.resync: Optional[Callable[[], Iterable[NamedTensors]]] = None
        self.request_id_prefix = f"{uuid.uuid4().hex[:12]}-g{self.group.index}"
        self.generate_calls = itertools.count()
        self.weights_synced = False
        self.released_tags: set = set()
        self.restarts = 0
        urls = self.config.urls
        # with user-started servers, group g talks to urls[g % len(urls)]; the first group per server syncs it
        self.updates_server = not urls or self.group.index < len(urls)
        if self.group.is_leader:
            if urls:
                url = urls[self.group.index % len(urls)]
            else:
                self.launcher = launcher or ServerProcess(
                    self.config, hf_dir, log_dir or self.config.log_dir or "sglang_logs",
                    base_gpu_id=self.group.base_gpu_id, name=f"sglang_group{self.group.index}",
                )
                url = self.launcher.start()
            self.client = self._connect(url)

    def _connect(self, url: str) -> SGLangClient:
        return SGLangClient(url, self.config.request_timeout_s, self.config.max_retries,
                            self.config.retry_backoff_s, self.config.max_concurrent_requests)

    # ---- generation ----
    def generate(self, requests: Sequence[RolloutRequest], sampling: SamplingParams) -> List[RolloutResult]:
        # SGLang runs its own image processor on the encoded images, so the tensors stay here
        light = [dataclasses.replace(request, pixel_values=None, image_grid_thw=None) for request in requests]
        per_member = self.group.gather_to_leader(light)
        answers = None
        if self.group.is_leader:
            flat = [request for member in per_member for request in member]
            try:
                results = ("ok", self._generate_on_leader(flat, sampling))
            except RolloutError as error:
                results = ("error", str(error))
            answers = self._split_by_member(results, [len(member) for member in per_member], sampling.n)
        status, mine = self.group.scatter_from_leader(answers)
        if status == "error":
            raise RolloutError(mine)
        return mine

    @staticmethod
    def _split_by_member(results, counts: List[int], n: int):
        status, value = results
        if status == "error":
            return [results] * len(counts)
        split, start = [], 0
        for count in counts:
            mine = [dataclasses.replace(result, request_index=result.request_index - start)
                    for result in value[start * n:(start + count) * n]]
            split.append(("ok", mine))
            start += count
        return split

    def _generate_on_leader(self, requests: List[RolloutRequest], sampling: SamplingParams) -> List[RolloutResult]:
        """All requests' samples, ordered by (request, sample); completed samples survive a restart."""
        done: Dict[tuple, RolloutResult] = {}
        keys = [(request, sample) for request in range(len(requests)) for sample in range(sampling.n)]
        # SGLang reads sampling_seed only with --enable-deterministic-inference; without it no seed is sent
        seeds = self._sample_seeds(len(requests), sampling) if self.config.deterministic_inference else None
        single = dataclasses.replace(sampling, n=1, seed=None)
        call = f"{self.request_id_prefix}-c{next(self.generate_calls)}"
        for attempt in itertools.count():
            pending = [key for key in keys if key not in done]
            if not pending:
                return [done[key] for key in keys]
            failure = self._send_all(requests, pending, single, seeds, done, f"{call}-p{attempt}")
            if failure is not None:
                self._recover(failure)

    def _sample_seeds(self, num_requests: int, sampling: SamplingParams) -> Optional[torch.Tensor]:
        # one request per sample, each with its own seed: n copies of one seed would draw n equal samples
        if sampling.seed is None:
            return None
        requests = torch.arange(num_requests).repeat_interleave(sampling.n)
        samples = torch.arange(sampling.n).repeat(num_requests)
        return sequence_seeds(sampling.seed, requests, samples).view(num_requests, sampling.n)

    def _send_all(self, requests, pending, single: SamplingParams, seeds, done, rid_prefix: str) -> Optional[ServerUnreachable]:
        """Send the pending samples concurrently; record answers in `done`; the first outage, if any."""
        failure = None
        with ThreadPoolExecutor(max_workers=max(1, min(len(pending), self.config.max_concurrent_requests))) as pool:
            futures = {}
            for request_index, sample_index in pending:
                params = single if seeds is None else dataclasses.replace(single, seed=int(seeds[request_index, sample_index]))
                payload = generate_payload(requests[request_index], params, rid=f"{rid_prefix}-r{request_index}s{sample_index}")
                futures[pool.submit(self.client.generate, payload)] = (request_index, sample_index)
            for future in as_completed(futures):
                request_index, sample_index = futures[future]
                try:
                    (result,) = parse_generate_answer(future.result(), request_index, 1)
                except ServerUnreachable as error:
                    failure = failure or error
                    continue
                done[(request_index, sample_index)] = dataclasses.replace(result, sample_index=sample_index)
        return failure

    def _recover(self, failure: ServerUnreachable) -> None:
        if self.launcher is None:
            raise RolloutError(f"{failure}; it is one of rollout.sglang.urls, so restart it yourself") from failure
        if self.restarts >= self.config.max_restarts:
            raise RolloutError(
                f"{failure}\nSGLang server failed again after {self.restarts} restarts "
                f"(rollout.sglang.max_restarts={self.config.max_restarts}); server log tail:\n{self.launcher.log_tail()}"
            ) from failure
        self.restarts += 1
        logger.warning("SGLang server down (%s); restart %d of %d", failure, self.restarts, self.config.max_restarts)
        self.push.close(None)
        self.client.close()
        self.launcher.stop()
        self.client = self._connect(self.launcher.start())
        self.released_tags.clear()
        if self.weights_synced and self.updates_server:
            if self.resync is None:
                raise RolloutError(
                    "SGLang server restarted but cannot be re-synced: the last update_weights got a one-shot "
                    "iterator (or a WeightStream without again(): the bridge cannot re-export on this rank alone "
                    "when the actor's export is tensor, pipeline or expert parallel); restart the run from its "
                    "last checkpoint"
                )
            self._push_on_leader(self.resync())

    # ---- weights ----
    def update_weights(self, buckets: Iterable[NamedTensors]) -> None:
        """Push buckets of full tensors under HF checkpoint names (collective over the group)."""
        if not self.updates_server:  # another group updates this user-started server
            for _ in buckets:
                pass
            return
        self.weight_version += 1
        if self.config.weight_sync == "tensor" and self.group.size > 1:
            self._push_tensor_collective(buckets)
        elif self.group.is_leader:
            self._run_on_leader(self._push_on_leader, buckets)
        else:  # the leader broadcasts from its own copy; members still walk the (possibly collective) iteration
            for _ in buckets:
                pass
            self._run_on_leader(None)
        self.weights_synced = True
        self.resync = _resync_source(buckets)

    def _push_on_leader(self, buckets: Iterable[NamedTensors]) -> None:
        """The whole session from this process alone (its tensors stand for every engine rank)."""
        self._resume_weights()
        self.push.prepare(self.client)
        begin_session(self.client)
        iterator = iter(buckets)
        try:
            for bucket in iterator:
                bucket = list(bucket)
                self.checkpoint.check(bucket)
                if isinstance(self.push, TensorPush):
                    for same_dtype in split_by_dtype(bucket):
                        # this process stands in for every engine rank, each reading its own copy of the handles
                        entries = [serialize_bucket(same_dtype) for _ in range(self.config.tensor_parallel)]
                        self.push.push(self.client, entries, str(self.weight_version))
                else:
                    self.push.push(self.client, bucket, str(self.weight_version))
        except RolloutError:
            self._abandon_session()
            for _ in iterator:  # group members are still walking the iteration, which may be collective
                pass
            raise
        end_session(self.client)

    def _push_tensor_collective(self, buckets: Iterable[NamedTensors]) -> None:
        """Each member serializes its own GPU's tensors; the leader sends one entry per engine rank."""
        self._run_on_leader(lambda: (self._resume_weights(), begin_session(self.client)))
        try:
            for bucket in buckets:
                bucket = list(bucket)
                self.checkpoint.check(bucket)
                for same_dtype in split_by_dtype(bucket):
                    entries = self.group.gather_to_leader(serialize_bucket(same_dtype))
                    # the answer doubles as the barrier that keeps every member's IPC buffers alive until loaded
                    self._run_on_leader(lambda: self.push.push(self.client, entries, str(self.weight_version)))
        except RolloutError:
            if self.group.is_leader:
                self._abandon_session()
            raise
        self._run_on_leader(end_session, self.client)

    def _abandon_session(self) -> None:
        try:
            self.client.end_weight_update()
        except RolloutError:  # the original error is the one to report
            pass

    def _run_on_leader(self, action, *args):
        return self.group.run_on_leader(action, *args)

    def get_weights(self, names: Sequence[str]) -> Dict[str, torch.Tensor]:
        raise RolloutError(
            "SGLang 0.5.23 cannot return weights by name for Qwen2.5-VL or Kimi-VL (no get_weights_by_name); "
            "a sync is verified by comparing log-probs of a probe batch instead (bridge/refit_check.py)"
        )

    # ---- memory ----
    def release_memory(self) -> None:
        """Free the server's weights, KV cache and CUDA graphs (needs enable_memory_saver)."""
        if self.config.enable_memory_saver:
            self._run_on_leader(self._release_on_leader)

    def _release_on_leader(self) -> None:
        self.client.release_memory_occupation(None)
        self.released_tags = {"weights", *ENGINE_MEMORY_TAGS_AFTER_WEIGHTS}

    def resume_memory(self) -> None:
        if self.config.enable_memory_saver:
            self._run_on_leader(self._resume_on_leader)

    def _resume_on_leader(self) -> None:
        # weights first, then the cache: the order slime uses, so peak memory stays at one of the two
        self._resume_weights()
        if self.released_tags:
            self.client.resume_memory_occupation(sorted(self.released_tags))
            self.released_tags.clear()

    def _resume_weights(self) -> None:
        if "weights" in self.released_tags:
            self.client.resume_memory_occupation(["weights"])
            self.released_tags.discard("weights")

    def shutdown(self) -> None:
        if not self.group.is_leader or self.client is None:
            return
        self.push.close(self.client)
        self.client.close()
        self.client = None
        if self.launcher is not None:
            self.launcher.stop()

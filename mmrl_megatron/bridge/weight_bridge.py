"""Move the actor's weights into a rollout engine: gather -> convert -> bucket -> push.

Gathering and converting are one collective (convert.iter_hf_tensors: TP all-gather, PP/EP
broadcast, rule-table renaming, vocabulary padding removed) that every rank of the actor joins;
only ranks holding an engine push the resulting full, HF-named tensors into it, bucket by bucket.
"""
import functools
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import torch

from ..rollout.engine import RolloutEngine, WeightStream
from .buckets import bucket_by_bytes, tensor_bytes
from .checks import check_names_known, compare_with_engine, spread_sample
from .errors import BridgeError
from .refit_check import RefitProbe, check_refit

NamedTensor = Tuple[str, torch.Tensor]
ExportFunction = Callable[[object], Iterable[NamedTensor]]


@dataclass(frozen=True)
class SyncStats:
    seconds: float
    gigabytes: float  # full (unsharded) tensor bytes produced on this rank, 1e9 bytes per GB
    gb_per_s: float
    tensors: int
    buckets: int

    def as_metrics(self, prefix: str = "weight_sync/") -> Dict[str, float]:
        return {f"{prefix}{key}": float(value) for key, value in self.__dict__.items()}


def _exports_collectively(dims) -> bool:
    """Whether convert.iter_hf_tensors gathers over other ranks (tensor, pipeline or expert parallel)."""
    return dims is not None and (dims.tensor > 1 or dims.pipeline > 1 or dims.expert > 1)


class _Recorder:
    """Passes named tensors through while counting bytes and remembering names in order."""

    def __init__(self) -> None:
        self.names: List[str] = []
        self.bytes = 0

    def record(self, named_tensors: Iterable[NamedTensor]) -> Iterator[NamedTensor]:
        for name, tensor in named_tensors:
            self.names.append(name)
            self.bytes += tensor_bytes(tensor)
            yield name, tensor


class WeightBridge:
    """Streams the actor's weights into `engine` after each update.

    `model_chunks`: this rank's model chunks (one per virtual pipeline stage), as convert.iter_hf_tensors
    takes them. `engine`: the rollout engine on ranks that hold one, None elsewhere; every actor rank
    calls sync() and verify() together because both run the gather collective. `bucket_bytes`: the most
    tensor bytes handed to the engine in one update_weights bucket. `dims`: the parallel.ParallelDims the
    chunks were built under, whose groups convert.iter_hf_tensors gathers over. `export` replaces
    convert.iter_hf_tensors (tests, other model families; `dims` may then be None). `probe`: what verify()
    checks for engines that cannot return weights by name (refit_check.py).

    The engine also gets a way to re-create the buckets from the actor's current weights (to reload a
    server that restarted): possible on the engine's rank alone only where the export is not
    collective; `export_is_collective` (default: whether `dims` splits the model over ranks) says which."""

    def __init__(self, model_chunks, engine: Optional[RolloutEngine], bucket_bytes: int, dims=None,
                 export: Optional[ExportFunction] = None, check_names: bool = True,
                 probe: Optional[RefitProbe] = None, export_is_collective: Optional[bool] = None) -> None:
        if bucket_bytes <= 0:
            raise BridgeError(f"bucket_bytes must be positive, got {bucket_bytes} (rollout.sync_bucket_mb)")
        self.model_chunks = model_chunks
        self.engine = engine
        self.bucket_bytes = bucket_bytes
        if export is None:
            from ..convert import iter_hf_tensors

            export = functools.partial(iter_hf_tensors, dims=dims)
        self._export = export
        # an engine that cannot read weights by name checks names itself, before sending (SGLang)
        self._names_checked = not check_names or (engine is not None and not engine.reads_weights_by_name)
        self.probe = probe
        self._collective = _exports_collectively(dims) if export_is_collective is None else export_is_collective
        self.sent_names: List[str] = []

    def sync(self) -> SyncStats:
        """Push every converted tensor to the engine; returns timing for the step metrics (collective)."""
        start = time.perf_counter()
        recorder = _Recorder()
        buckets = bucket_by_bytes(recorder.record(self._export(self.model_chunks)), self.bucket_bytes)
        pushed = _CountingIterator(buckets)
        if self.engine is not None:
            self.engine.update_weights(WeightStream(pushed, None if self._collective else self._fresh_buckets))
        # Ranks without an engine (and an engine that stopped early) still drain the stream, so that
        # every rank takes part in every gather collective and none is left waiting.
        unconsumed = sum(1 for _ in pushed)
        if self.engine is not None and unconsumed:
            raise BridgeError(f"the engine's update_weights returned with {unconsumed} bucket(s) unread, starting "
                              f"after tensor {recorder.names[-1] if recorder.names else '(none)'}")
        if any(device.type == "cuda" for device in pushed.devices):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        self.sent_names = recorder.names
        if self.engine is not None and not self._names_checked:
            check_names_known(self.engine, self.sent_names)
            self._names_checked = True
        gigabytes = recorder.bytes / 1e9
        return SyncStats(seconds=seconds, gigabytes=gigabytes, gb_per_s=gigabytes / max(seconds, 1e-9),
                         tensors=len(recorder.names), buckets=pushed.count)

    def _fresh_buckets(self) -> Iterable[List[NamedTensor]]:
        """The actor's current weights, bucketed as sync() sends them (for re-syncing a restarted server)."""
        return bucket_by_bytes(self._export(self.model_chunks), self.bucket_bytes)

    def verify(self, num_tensors: Optional[int] = 8) -> List[str]:
        """Compare `num_tensors` engine tensors (spread over the model; None: all) with the actor's
        converted ones, bit for bit after casting to the engine's dtype; for an engine that cannot
        return weights by name, run the refit check (probe log-probs) instead. Collective; raises
        BridgeError naming the tensor, or the log-prob difference, on a mismatch. Returns the names compared."""
        if not self.sent_names:
            raise BridgeError("verify() needs a sync() first: it compares what the last sync sent")
        if self.engine is not None and not self.engine.reads_weights_by_name:
            if self.probe is None:
                raise BridgeError("rollout.verify_weight_sync with an engine that cannot return weights by name "
                                  "(SGLang) needs a RefitProbe: build the WeightBridge with probe=")
            check_refit(self.engine, self.probe)
            return list(self.sent_names)
        sample = spread_sample(self.sent_names, num_tensors)
        wanted = set(sample)
        expected = {name: tensor.detach().to("cpu", copy=True)
                    for name, tensor in self._export(self.model_chunks) if name in wanted}
        if self.engine is not None:
            compare_with_engine(expected, self.engine.get_weights(sample))
        return sample


class _CountingIterator:
    """Counts the buckets taken from `buckets` and notes the devices their tensors live on."""

    def __init__(self, buckets: Iterator[List[NamedTensor]]) -> None:
        self._buckets = buckets
        self.count = 0
        self.devices = set()

    def __iter__(self):
        return self

    def __next__(self) -> List[NamedTensor]:
        bucket = next(self._buckets)
        self.count += 1
        self.devices.update(tensor.device for _, tensor in bucket)
        return bucket

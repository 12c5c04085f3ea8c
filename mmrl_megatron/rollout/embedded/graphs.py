"""The decode step as CUDA graphs: one per (batch bucket, KV-length bucket), captured on first use.

A decode step of a 3B model launches hundreds of small kernels; at batch 256 their launch cost is
comparable to the work, so replaying a captured graph is what makes decode memory-bound. The step reads
and writes only fixed storage (the cache and its slot state, slot_sampler.SlotSampler), so a replay
needs no copies; it covers the forward and the draw (the sampling parameters are part of the graph).
"""
from typing import Callable, Dict, Tuple

import torch

KV_BUCKET = 256  # KV length granularity: attention reads at most this many unused cached positions


def batch_bucket(batch: int, slots: int) -> int:
    """The smallest power of two >= batch, capped at the slot count."""
    return min(1 << max(batch - 1, 0).bit_length(), slots)


def kv_bucket(kv_len: int, max_len: int) -> int:
    return min(-(-kv_len // KV_BUCKET) * KV_BUCKET, max_len)


class DecodeGraphs:
    """Replays step(batch, kv_len) from captured graphs sharing one memory pool."""

    def __init__(self, step: Callable[[int, int], None], slots: int, max_len: int) -> None:
        self._step = step
        self._slots = slots
        self._max_len = max_len
        self._pool = torch.cuda.graph_pool_handle()
        self._graphs: Dict[Tuple[int, int], torch.cuda.CUDAGraph] = {}

    def __call__(self, batch: int, kv_len: int) -> None:
        """The step for slots [0, batch) and the first kv_len cached positions, run over their buckets (the
        extra slots are idle, the extra positions masked)."""
        key = (batch_bucket(batch, self._slots), kv_bucket(kv_len, self._max_len))
        if key in self._graphs:
            self._graphs[key].replay()
        else:  # the capture's warm-up ran this step
            self._graphs[key] = self._capture(*key)

    @property
    def captured(self) -> int:
        return len(self._graphs)

    def _capture(self, batch: int, kv_len: int) -> torch.cuda.CUDAGraph:
        # Warm up on a side stream (lazy cuBLAS/allocator initialisation and compilation must not happen inside
        # capture). The warm-up is the real step of the current slot state; capturing records without running,
        # so the state advances exactly once.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._step(batch, kv_len)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            self._step(batch, kv_len)
        return graph

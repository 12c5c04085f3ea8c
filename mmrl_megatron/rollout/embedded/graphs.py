"""The decode step as CUDA graphs: one per (batch bucket, KV-length bucket), captured on first use.

A decode step of a 3B model launches hundreds of small kernels; at batch 256 their launch cost is
comparable to the work, so replaying a captured graph is what makes decode memory-bound. Inputs
are the cache's slot state (fixed storage), so a replay needs no copies.
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
    """Replays decode(batch, kv_len) -> logits from captured graphs sharing one memory pool."""

    def __init__(self, decode: Callable[[int, int], torch.Tensor], slots: int, max_len: int) -> None:
        self._decode = decode
        self._slots = slots
        self._max_len = max_len
        self._pool = torch.cuda.graph_pool_handle()
        self._graphs: Dict[Tuple[int, int], Tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def __call__(self, batch: int, kv_len: int) -> torch.Tensor:
        """Logits for slots [0, batch); rows past `batch` up to the bucket belong to idle slots."""
        key = (batch_bucket(batch, self._slots), kv_bucket(kv_len, self._max_len))
        if key not in self._graphs:
            self._graphs[key] = self._capture(*key)
        graph, logits = self._graphs[key]
        graph.replay()
        return logits[:batch]

    def _capture(self, batch: int, kv_len: int) -> Tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        # Warm up on a side stream (lazy cuBLAS/allocator initialisation must not happen inside capture).
        # The warm-up is a real decode of the current slot state, so its cache writes equal the replay's.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._decode(batch, kv_len)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = self._decode(batch, kv_len)
        return graph, logits

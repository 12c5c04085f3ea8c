"""WeightBridge on one process with a stand-in export and a dict engine: bucketing, stats, checks."""
import pytest
import torch

from mmrl_megatron.bridge import BridgeError, WeightBridge, bucket_by_bytes
from tests.bridge.dict_engine import DictEngine

SHAPES = {"model.embed_tokens.weight": (40, 8), "model.layers.0.mlp.up_proj.weight": (16, 8),
          "model.layers.0.input_layernorm.weight": (8,), "model.norm.weight": (8,), "lm_head.weight": (40, 8)}


def _actor_tensors(seed: int):
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=generator) for name, shape in SHAPES.items()}


class _Actor:
    """Stands in for model chunks plus convert.iter_hf_tensors: yields fixed named tensors."""

    def __init__(self, seed: int = 0) -> None:
        self.tensors = _actor_tensors(seed)
        self.exports = 0

    def export(self, model_chunks):
        assert model_chunks is self
        self.exports += 1
        yield from self.tensors.items()


def test_bucket_by_bytes_bounds_and_order():
    """Invariant: buckets keep order, never exceed the bound unless one tensor alone is larger."""
    named = [(f"t{i}", torch.zeros(size)) for i, size in enumerate([3, 5, 2, 20, 1, 1])]
    buckets = list(bucket_by_bytes(named, bucket_bytes=8 * 4))
    assert [name for bucket in buckets for name, _ in bucket] == [name for name, _ in named]
    for bucket in buckets:
        total = sum(t.numel() * 4 for _, t in bucket)
        assert total <= 32 or len(bucket) == 1
    assert [[name for name, _ in bucket] for bucket in buckets] == [["t0", "t1"], ["t2"], ["t3"], ["t4", "t5"]]


def test_sync_loads_every_tensor_and_reports_stats():
    """Invariant: after sync the engine holds the actor's tensors exactly; stats count the bytes sent."""
    actor, engine = _Actor(), DictEngine(SHAPES)
    bridge = WeightBridge(actor, engine, bucket_bytes=40 * 8 * 4, export=actor.export)
    stats = bridge.sync()
    for name, tensor in actor.tensors.items():
        assert torch.equal(engine.weights[name], tensor), name
    total_bytes = sum(t.numel() * 4 for t in actor.tensors.values())
    assert stats.gigabytes == pytest.approx(total_bytes / 1e9)
    assert stats.tensors == len(SHAPES) and stats.buckets == len(engine.bucket_sizes) >= 2
    assert max(engine.bucket_sizes) <= 40 * 8 * 4
    assert stats.seconds > 0 and stats.gb_per_s == pytest.approx(stats.gigabytes / stats.seconds)
    assert set(stats.as_metrics()) == {f"weight_sync/{key}" for key in
                                       ["seconds", "gigabytes", "gb_per_s", "tensors", "buckets"]}
    assert bridge.verify(num_tensors=None) == list(SHAPES)


def test_sync_without_engine_still_runs_the_export():
    """Invariant: ranks without an engine still drain the export stream (it is a collective)."""
    actor = _Actor()
    stats = WeightBridge(actor, None, bucket_bytes=64, export=actor.export).sync()
    assert actor.exports == 1 and stats.tensors == len(SHAPES)


def test_unknown_name_is_reported():
    """Invariant: a name the engine does not have stops the sync, naming the tensor (SGLang would skip it)."""
    actor = _Actor()
    engine = DictEngine({name: shape for name, shape in SHAPES.items() if name != "model.norm.weight"})
    with pytest.raises(BridgeError, match="model.norm.weight"):
        WeightBridge(actor, engine, bucket_bytes=1 << 20, export=actor.export).sync()


def test_verify_names_the_mismatching_tensor():
    """Invariant: verify raises on any engine tensor that differs from the actor's, naming it."""
    actor, engine = _Actor(), DictEngine(SHAPES)
    bridge = WeightBridge(actor, engine, bucket_bytes=1 << 20, export=actor.export)
    bridge.sync()
    assert "lm_head.weight" in bridge.verify(num_tensors=2)  # first and last names are always sampled
    engine.weights["lm_head.weight"][3, 1] += 1e-6
    with pytest.raises(BridgeError, match="lm_head.weight differs"):
        bridge.verify(num_tensors=2)


def test_verify_casts_to_engine_dtype():
    """Invariant: a bf16 engine fed fp32 tensors verifies against the bf16 cast of the actor's tensors."""
    actor, engine = _Actor(), DictEngine(SHAPES, dtype=torch.bfloat16)
    bridge = WeightBridge(actor, engine, bucket_bytes=1 << 20, export=actor.export)
    bridge.sync()
    assert len(bridge.verify(num_tensors=3)) == 3


def test_engine_that_stops_early_is_an_error():
    """Invariant: an engine that does not read every bucket fails the sync instead of leaving stale weights."""

    class LazyEngine(DictEngine):
        def update_weights(self, buckets):
            super().update_weights([next(iter(buckets))])

    actor = _Actor()
    with pytest.raises(BridgeError, match="unread"):
        WeightBridge(actor, LazyEngine(SHAPES), bucket_bytes=64, export=actor.export).sync()

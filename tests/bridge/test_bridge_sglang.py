"""WeightBridge into SGLangEngine against the fake SGLang server: the refit check that works without
/get_weights_by_name, and re-syncing a restarted server from the actor's current weights."""
import pytest
import torch

from mmrl_megatron.bridge import BridgeError, RefitProbe, WeightBridge
from mmrl_megatron.models.qwen2_5_vl.tiny import build_tiny_checkpoint
from mmrl_megatron.rollout.errors import RolloutError
from mmrl_megatron.rollout.types import RolloutRequest, SamplingParams
from tests.rollout.fake_sglang_server import checkpoint_tensors
from tests.rollout.test_sglang_engine import bigram_logprobs, make_engine


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return build_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny_qwen")), seed=0)


class _Actor:
    """Model chunks plus their export: the checkpoint's tensors, changed by `step` like an update."""

    def __init__(self, hf_dir):
        self.tensors = dict(checkpoint_tensors(hf_dir))
        self.exports = 0

    def step(self, factor: float) -> None:
        self.tensors = {name: tensor * factor for name, tensor in self.tensors.items()}

    def export(self, model_chunks):
        assert model_chunks is self
        self.exports += 1
        yield from self.tensors.items()

    def logprobs(self, requests, results):
        """The actor's scoring of the engine's responses: the fake's bigram model over the actor's tensors."""
        return [torch.tensor(bigram_logprobs(self.tensors, requests[result.request_index].prompt_ids[-1],
                                             result.response_ids, 1.0)) for result in results]


def probe_for(actor) -> RefitProbe:
    requests = [RolloutRequest(prompt_ids=[40 + index, 50 + index]) for index in range(3)]
    return RefitProbe(requests=requests, actor_logprobs=actor.logprobs, max_new_tokens=4, tolerance=1e-4)


def test_sync_and_verify_work_without_get_weights_by_name(hf_dir):
    """0.5.23's VL models answer /get_weights_by_name with HTTP 400: the first sync must not call it, and
    verify() compares the engine's and the actor's log-probs of a probe batch instead."""
    engine, launcher = make_engine(hf_dir)
    actor = _Actor(hf_dir)
    bridge = WeightBridge(actor, engine, bucket_bytes=1 << 16, export=actor.export, probe=probe_for(actor))
    try:
        actor.step(0.5)
        bridge.sync()
        bridge.verify()
        assert all(route != "/get_weights_by_name" for route, _ in launcher.server.calls)
        embed = launcher.server.weights["model.embed_tokens.weight"]
        launcher.server.weights["model.embed_tokens.weight"] = embed * 2  # the engine no longer holds the actor's weights
        with pytest.raises(BridgeError, match="differ from the actor's"):
            bridge.verify()
    finally:
        engine.shutdown()


def test_verify_without_a_probe_says_what_is_missing(hf_dir):
    """An engine that cannot read weights by name and no probe: a clear error, not an HTTP 400."""
    engine, _ = make_engine(hf_dir)
    actor = _Actor(hf_dir)
    bridge = WeightBridge(actor, engine, bucket_bytes=1 << 16, export=actor.export)
    try:
        bridge.sync()
        with pytest.raises(BridgeError, match="RefitProbe"):
            bridge.verify()
    finally:
        engine.shutdown()


def test_a_restarted_server_is_resynced_from_the_actors_current_weights(hf_dir):
    """The bridge's buckets are a one-shot stream; after a crash the engine asks the bridge for them
    again (a fresh export), so the new server holds the actor's weights, not its checkpoint's."""
    engine, launcher = make_engine(hf_dir, crash_plan=[1], max_restarts=1)
    actor = _Actor(hf_dir)
    bridge = WeightBridge(actor, engine, bucket_bytes=1 << 16, export=actor.export, export_is_collective=False)
    try:
        actor.step(0.25)
        bridge.sync()
        requests = [RolloutRequest(prompt_ids=[10 + index, 20 + index]) for index in range(3)]
        results = engine.generate(requests, SamplingParams(n=1, max_new_tokens=3))
        assert len(results) == 3 and len(launcher.servers) == 2 and actor.exports == 2
        for name, tensor in actor.tensors.items():
            assert torch.equal(launcher.servers[1].weights[name], tensor), name
    finally:
        engine.shutdown()


def test_a_collective_export_cannot_resync_alone_and_says_so(hf_dir):
    """Where the export gathers over other ranks, the engine's rank cannot re-run it alone: a clear stop."""
    engine, launcher = make_engine(hf_dir, crash_plan=[0], max_restarts=1)
    actor = _Actor(hf_dir)
    bridge = WeightBridge(actor, engine, bucket_bytes=1 << 16, export=actor.export, export_is_collective=True)
    try:
        bridge.sync()
        with pytest.raises(RolloutError, match="cannot be re-synced(.|\n)*expert parallel"):
            engine.generate([RolloutRequest(prompt_ids=[1, 2])], SamplingParams(max_new_tokens=2))
    finally:
        engine.shutdown()

"""actor.cuda_graphs' bookkeeping on the CPU (trainer/update_graphs.py): which micro-batches may share a graph,
when one is captured, replayed or dropped, and which layouts refuse the switch. The graphs themselves run in
tests/trainer/test_update_graphs_gpu.py."""
import pytest
import torch

from mmrl_megatron.models.common.packing import pack_sequences
from mmrl_megatron.trainer import update_graphs
from mmrl_megatron.trainer.batch import Sample, build_micro_batches


def _micro_batch(lengths, seed=0, extra_tensor=False):
    """One micro-batch of text samples (a third prompt) on the meta device, where, as on a GPU, only shapes
    and dtypes of the tensors are visible to the host."""
    generator = torch.Generator().manual_seed(seed)
    samples = []
    for length in lengths:
        ids = torch.randint(0, 100, (length,), generator=generator).tolist()
        prompt = length // 3
        sample = Sample(ids[:prompt], ids[prompt:], group=0, position_ids=torch.arange(length).expand(3, length))
        sample.tensors["advantages"] = torch.randn(length - prompt, generator=generator)
        if extra_tensor:
            sample.tensors["ref_logprobs"] = torch.zeros(length - prompt)
        samples.append(sample)
    [micro_batch] = build_micro_batches(samples, sum(lengths), pack_sequences)
    return micro_batch.to(torch.device("meta"))


def test_signature_ignores_device_values_and_sees_everything_the_host_reads():
    """Invariant: other token ids and advantages (device values, copied in before a replay) keep the
    signature; other lengths or packing order, another loss key, or another set of response tensors change it."""
    signature = update_graphs.graph_signature
    reference = signature(_micro_batch([8, 12]), (20.0, 2.0))
    assert signature(_micro_batch([8, 12], seed=1), (20.0, 2.0)) == reference
    assert signature(_micro_batch([12, 8]), (20.0, 2.0)) != reference  # same total, other bounds
    assert signature(_micro_batch([8, 13]), (20.0, 2.0)) != reference
    assert signature(_micro_batch([8, 12]), (21.0, 2.0)) != reference
    assert signature(_micro_batch([8, 12], extra_tensor=True), (20.0, 2.0)) != reference


def test_stacked_response_tensors_are_built_once_per_sample_tensor():
    """Invariant: stacked() returns the same device tensor while the samples hold the same tensors (a graph
    reads it from one address) and restacks when a sample's tensor is replaced."""
    samples = [Sample([1, 2], [3, 4, 5], group=0, position_ids=torch.arange(5).expand(3, 5))]
    samples[0].tensors["advantages"] = torch.ones(3)
    [micro_batch] = build_micro_batches(samples, 8, pack_sequences)
    first = micro_batch.stacked("advantages")
    assert micro_batch.stacked("advantages") is first
    samples[0].tensors["advantages"] = torch.full((3,), 2.0)
    assert micro_batch.stacked("advantages").tolist() == [[2.0, 2.0, 2.0]]


class _RecordedCapture:
    """Stands in for a captured graph: 'replays' by calling the forward-backward on the new micro-batch."""

    captures = 0

    def __init__(self, micro_batch, stacked_names, forward_backward, stream):
        type(self).captures += 1
        self.forward_backward, self.replayed = forward_backward, False

    def replay(self, micro_batch):
        self.replayed = True
        return self.forward_backward(micro_batch)


def test_a_repeated_signature_is_captured_once_and_shapes_that_stop_free_their_graph(monkeypatch):
    """Invariant: a signature's first micro-batch runs eagerly and its second is captured; later ones replay.
    With the one slot taken, another repeating signature stays eager (no eviction ping-pong); an update in
    which the captured signature did not occur drops its graph, so the next repeat can take the slot."""
    monkeypatch.setattr(update_graphs, "_CapturedMicroBatch", _RecordedCapture)
    _RecordedCapture.captures = 0
    graphs = update_graphs.UpdateGraphs(capacity=1)
    eager_runs = []

    def forward_backward(micro_batch):
        eager_runs.append(micro_batch.num_tokens)
        return {}

    def update(*shapes):
        graphs.begin_update()
        for lengths in shapes:
            graphs.run(_micro_batch(lengths), "key", forward_backward)

    update([8, 8], [8, 8], [5])
    assert (_RecordedCapture.captures, graphs.replays) == (1, 1)
    update([8, 8], [5])  # [5] repeats, but the slot is taken
    assert (_RecordedCapture.captures, graphs.replays) == (1, 2)
    update([5])  # the slot stays taken: [8, 8] was replayed in the update before
    assert (_RecordedCapture.captures, graphs.replays) == (1, 2)
    update([5], [5])  # [8, 8] did not occur in the last update: its graph goes, and [5] takes the slot
    assert (_RecordedCapture.captures, graphs.replays) == (2, 4)
    assert len(eager_runs) == 8  # every micro-batch computed once, eagerly or through the stand-in


def test_layouts_a_graph_cannot_cover_are_refused():
    """Invariant: actor.cuda_graphs on the CPU, with the model split over GPUs (here pipeline stages), MoE or
    recompute is a ConfigError naming every reason and the switch to turn off."""
    from types import SimpleNamespace

    from mmrl_megatron.config import ConfigError
    from mmrl_megatron.config.schema import Config
    from mmrl_megatron.trainer.build import check_cuda_graphs

    config = Config()
    config.model.recompute = "full"
    with pytest.raises(ConfigError) as error:
        check_cuda_graphs(SimpleNamespace(num_moe_experts=8), config, torch.device("cpu"),
                          SimpleNamespace(tensor=1, pipeline=2, layout=SimpleNamespace(context=1)))
    message = str(error.value)
    for reason in ("a CUDA device", "the model on one GPU", "a dense model", "model.recompute=none",
                   "actor.cuda_graphs=false"):
        assert reason in message


def _fixed_length_responses(requests, sampling):
    """Every response max_new_tokens long, so the micro-batches repeat their shapes (as fixed-length data does)."""
    from mmrl_megatron.rollout import RolloutResult
    from tests.trainer.stand_ins import VOCAB

    length = sampling.max_new_tokens
    return [RolloutResult(index, sample, [(sum(request.prompt_ids) + 3 * sample + t) % VOCAB for t in range(length)],
                          [-4.0] * length, "length")
            for index, request in enumerate(requests) for sample in range(sampling.n)]


def _two_steps(root: str, graphed: bool):
    """(step-2 metrics, actor weights, micro-batches replayed) after two stand-in GRPO steps, as lists."""
    from tests.trainer.stand_ins import stand_in_config, stand_in_trainer

    trainer = stand_in_trainer(stand_in_config(f"{root}/{graphed}"))
    trainer.parts.sources.engine.generate = _fixed_length_responses
    if graphed:  # in this rank's process, the CPU stands in for the GPU:
        update_graphs._CapturedMicroBatch = _RecordedCapture  # no CUDA graph here
        describe = update_graphs._describe  # and the micro-batches' tensors count as device tensors (shapes)
        update_graphs._describe = lambda value: describe(value.to("meta") if isinstance(value, torch.Tensor) else value)
        trainer.parts.actor.graphs = update_graphs.UpdateGraphs()
    for step in (1, 2):
        metrics = trainer.train_step(step)
    trainer.parts.tracker.close()
    weights = [p.detach().flatten().tolist() for p in trainer.parts.actor.chunks[0].parameters()]
    return metrics, weights, trainer.parts.actor.graphs.replays if graphed else 0


def test_the_graphed_schedule_trains_as_megatron_cores(tmp_path):
    """Invariant: on two data-parallel CPU ranks, the update's own one-stage schedule (what a graph captures:
    the loss over the micro-batch count, backward, then megatron-core's gradient finalisation) trains as
    megatron-core's schedule does (fp32, 1e-6: weights and metrics after two GRPO steps), with the trainer's
    loss key making the repeated micro-batches replay (the capture stood in by an eager pass): each rank's
    four micro-batches of 2 x 14 tokens replay from the second of step 1 on, 3 + 4."""
    from tests.cpu_ranks import run_on_cpu_ranks

    eager = run_on_cpu_ranks(2, _two_steps, str(tmp_path), False)
    graphed = run_on_cpu_ranks(2, _two_steps, str(tmp_path), True)
    for (eager_metrics, eager_weights, _), (metrics, weights, replays) in zip(eager, graphed):
        assert replays == 7
        for parameter, eager_parameter in zip(weights, eager_weights, strict=True):
            assert torch.allclose(torch.tensor(parameter), torch.tensor(eager_parameter), atol=1e-6)
        for key in ("loss/policy", "kl/mean", "actor/entropy", "actor/grad_norm", "reward/mean"):
            assert metrics[key] == pytest.approx(eager_metrics[key], rel=1e-6, abs=1e-9), key

"""The bridge between a real megatron actor and the embedded engine on CPU ranks, under four parallel layouts:
after every sync the engine's tensors equal the actor's converted tensors bit for bit (fp32), and the engine's
log-probs of its own samples (images included) equal the actor's scoring of them within 1e-4."""
import io

import pytest
import torch
from PIL import Image

from mmrl_megatron.models.qwen2_5_vl.tiny import build_tiny_checkpoint
from tests.cpu_ranks import run_on_cpu_ranks

LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]  # (TP, PP) on 4 ranks; the rest is data parallel
BUCKET_BYTES = 16 * 1024  # small, so a sync takes many buckets
LOGPROB_TOLERANCE = 1e-4


def _png(width: int, height: int, seed: int) -> bytes:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), generator=generator, dtype=torch.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels.numpy()).save(buffer, format="PNG")
    return buffer.getvalue()


def _requests(hf_dir: str):
    """A prompt with two images of different sizes and a text-only prompt, through the training data path."""
    from mmrl_megatron.config.schema import DataConfig
    from mmrl_megatron.data import PromptProcessor
    from mmrl_megatron.data.format import make_row, parse_row
    from mmrl_megatron.rollout import RolloutRequest

    processor = PromptProcessor(hf_dir, DataConfig(min_pixels=56 * 56, max_pixels=112 * 112))
    rows = [make_row("Which is larger?", [_png(56, 84, 1), _png(112, 56, 2)], "a", "test"),
            make_row("Say something.", [], "b", "test")]
    requests = []
    for index, row in enumerate(rows):
        sample = processor.process(parse_row(row), index)
        requests.append(RolloutRequest(prompt_ids=sample.prompt_ids, pixel_values=sample.pixel_values,
                                       image_grid_thw=sample.image_grid_thw, images=sample.images,
                                       prompt_text=sample.prompt_text))
    return requests


def _perturb(model, amount: float) -> None:
    """A stand-in for an optimizer step: every element moves by `amount`, consistently across shards."""
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(amount)


def _score_on_actor(model, dims, hf_dir: str, requests, results) -> torch.Tensor:
    """The actor's per-token log-probs of the engine's responses, through the trainer's scoring path."""
    from mmrl_megatron.models.hf_config import read_hf_config
    from mmrl_megatron.models.common.packing import pack_sequences
    from mmrl_megatron.trainer.batch import Sample, build_micro_batches
    from mmrl_megatron.models.family import position_rule
    from mmrl_megatron.trainer.losses import response_logprobs
    from mmrl_megatron.trainer.roles import ModelRole

    positions = position_rule(read_hf_config(hf_dir))
    samples = []
    for result in results:
        request = requests[result.request_index]
        sample = Sample(prompt_ids=request.prompt_ids, response_ids=result.response_ids, group=result.request_index,
                        pixel_values=request.pixel_values, image_grid_thw=request.image_grid_thw)
        sample.position_ids = positions(sample.prompt_ids, len(sample.response_ids), sample.image_grid_thw)
        samples.append(sample)
    role = ModelRole("actor", [model], torch.device("cpu"), dims)
    role.score(build_micro_batches(samples, 4096, pack_sequences),
               lambda logits, batch: response_logprobs(logits, batch, 1.0, dims.tensor_group), "logprobs")
    return [sample.tensors["logprobs"] for sample in samples]


def _bridge_on_layouts(hf_dir: str, requests):
    """On 4 ranks, per layout: build the actor, sync, verify all tensors, perturb, sync, verify again, then
    compare the engine's sampling log-probs with the actor's. The engine lives on global rank 0 only."""
    import torch.distributed as dist
    from megatron.core.utils import get_model_config

    from mmrl_megatron.bridge import WeightBridge
    from mmrl_megatron.models import build_model_from_dir
    from mmrl_megatron.parallel import ParallelDims, start_processes
    from mmrl_megatron.rollout import SamplingParams
    from mmrl_megatron.rollout.embedded import EmbeddedEngine

    engine = EmbeddedEngine(hf_dir, torch.device("cpu"), dtype=torch.float32) if dist.get_rank() == 0 else None
    report = []
    for step, (tensor, pipeline) in enumerate(LAYOUTS):
        dims = start_processes(ParallelDims(dist.get_world_size(), tensor=tensor, pipeline=pipeline),
                               torch.device("cpu"))
        model = build_model_from_dir(hf_dir, dims)
        get_model_config(model).variable_seq_lengths = True
        bridge = WeightBridge([model], engine, bucket_bytes=BUCKET_BYTES, dims=dims)
        first = bridge.sync()
        verified_first = bridge.verify(num_tensors=None)
        _perturb(model, 1e-3 * (step + 1))
        second = bridge.sync()
        verified_second = bridge.verify(num_tensors=None)

        results = [None]
        if engine is not None:
            results[0] = engine.generate(requests, SamplingParams(n=2, temperature=1.0, max_new_tokens=6,
                                                                  seed=step))
        dist.broadcast_object_list(results, src=0)
        actor_logprobs = _score_on_actor(model, dims, hf_dir, requests, results[0])
        differences = [float((torch.tensor(result.logprobs) - mine).abs().max())
                       for result, mine in zip(results[0], actor_logprobs)]
        report.append({"layout": (tensor, pipeline), "tensors": (len(verified_first), len(verified_second)),
                       "buckets": first.buckets, "gigabytes": second.gigabytes, "max_logprob_difference":
                       max(differences), "response_lengths": [len(r.response_ids) for r in results[0]]})
    return report


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    hf_dir = build_tiny_checkpoint(str(tmp_path_factory.mktemp("bridge") / "hf"))
    return run_on_cpu_ranks(4, _bridge_on_layouts, hf_dir, _requests(hf_dir))


def test_engine_equals_actor_after_every_sync(reports):
    """Invariant (issue 6, acceptance 1): after each sync, with the actor at (TP, PP) = (1,1), (2,1), (1,2), (2,2),
    every engine tensor equals the actor's converted tensor bit for bit; a perturbed actor re-syncs exactly."""
    for rank_report in reports:
        assert [entry["layout"] for entry in rank_report] == LAYOUTS
        for entry in rank_report:
            first, second = entry["tensors"]
            assert first == second > 50  # verify(None) compared every tensor the sync sent
            assert entry["buckets"] > 1


def test_engine_logprobs_match_actor_scoring(reports):
    """Invariant (issue 6, acceptance 2): the engine's per-token log-probs of its own samples (a prompt with two
    images of different sizes, and a text-only prompt) match the megatron actor's scoring within 1e-4 in fp32."""
    for rank_report in reports:
        for entry in rank_report:
            assert all(length > 0 for length in entry["response_lengths"])
            assert entry["max_logprob_difference"] < LOGPROB_TOLERANCE, entry

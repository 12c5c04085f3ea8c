"""The embedded engine on a tiny Qwen3-VL (CPU, fp32): log-probs equal transformers' own forward (QK-norm,
interleaved M-RoPE, DeepStack), weights round-trip under the published names, malformed prompts are named."""
import re

import pytest
import torch

from mmrl_megatron.models.qwen3_vl.tiny import build_tiny_checkpoint
from mmrl_megatron.rollout import RolloutError, RolloutRequest, SamplingParams
from mmrl_megatron.rollout.embedded import EmbeddedEngine
from mmrl_megatron.rollout.embedded.weights import iter_checkpoint_buckets
from tests.rollout.embedded_helpers import hf_logits, make_requests


GRIDS = [[1, 4, 4], None, [1, 4, 6]]  # two image sizes (4 and 6 pads) and a text-only prompt


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_tiny_checkpoint(str(tmp_path_factory.mktemp("qwen3_vl_engine")), seed=1)


@pytest.fixture(scope="module")
def hf_model(checkpoint):
    from transformers import Qwen3VLForConditionalGeneration

    return Qwen3VLForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def engine(checkpoint):
    engine = EmbeddedEngine(checkpoint, "cpu", torch.float32, max_batch_size=8)
    engine.load_checkpoint()
    return engine


@pytest.fixture(scope="module")
def requests(hf_model):
    return make_requests(hf_model.config, GRIDS)


def vision_tokens(config):
    return [config.vision_start_token_id, config.vision_end_token_id, config.image_token_id, config.video_token_id]


def sampling_params(config, **fields):
    """Sampling that ends a sequence at a sampled vision token (the tiny vocabulary makes them likely): HF's
    forward would read a generated pad as an image placeholder, the engine reads it as text."""
    return SamplingParams(ignore_eos=True, stop_token_ids=vision_tokens(config), **fields)


def hf_logprobs(model, request, result, temperature: float) -> torch.Tensor:
    """HF's log-probs of the sampled tokens; a final vision token is swapped for text in HF's input (the
    logits predicting a token never see it, so this changes none of them)."""
    fed = list(result.response_ids)
    if fed and fed[-1] in vision_tokens(model.config):
        fed[-1] = 10
    logits = hf_logits(model, request, fed) / temperature
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(result.response_ids)[:, None])[:, 0]


def test_logprobs_equal_a_separate_hf_forward(engine, hf_model, requests):
    """Sampled tokens' log-probs equal HF's log_softmax(logits/T) over prompt+response within 1e-5 (fp32) for
    prompts with images of two sizes (DeepStack at their pads) batched with a text-only prompt."""
    sampling = sampling_params(hf_model.config, n=2, temperature=0.8, max_new_tokens=8, seed=7, top_k=40)
    results = engine.generate(requests, sampling)
    assert [(r.request_index, r.sample_index) for r in results] == [(i, s) for i in range(3) for s in range(2)]
    for result in results:
        assert 1 <= len(result.response_ids) == len(result.logprobs) <= 8
        expected = hf_logprobs(hf_model, requests[result.request_index], result, sampling.temperature)
        torch.testing.assert_close(torch.tensor(result.logprobs), expected, rtol=0, atol=1e-5)


def test_deepstack_changes_the_image_prompts_logprobs(engine, hf_model, requests, monkeypatch):
    """The parity above depends on DeepStack: without its additions the image prompts' log-probs move off
    HF's by more than the tolerance, while the text-only prompt's stay equal."""
    monkeypatch.setattr(engine.decoder, "_deepstack_for", lambda hidden: None)
    sampling = sampling_params(hf_model.config, n=1, temperature=1.0, max_new_tokens=4, seed=3)
    for result in engine.generate(requests, sampling):
        expected = hf_logprobs(hf_model, requests[result.request_index], result, sampling.temperature)
        gap = float((torch.tensor(result.logprobs) - expected).abs().max())
        assert (gap > 1e-4) if GRIDS[result.request_index] else (gap < 1e-5), (result.request_index, gap)


def test_weights_round_trip_under_the_published_names(checkpoint, tmp_path):
    """update_weights then get_weights returns exactly the tensors sent (every checkpoint name, vision tower
    and DeepStack mergers included); unknown names and wrong shapes raise RolloutError naming the tensor."""
    other = build_tiny_checkpoint(str(tmp_path / "other"), seed=5)
    engine = EmbeddedEngine(checkpoint, "cpu", torch.float32, max_batch_size=2)
    sent = {name: tensor for bucket in iter_checkpoint_buckets(other, bucket_bytes=4096) for name, tensor in bucket}
    assert any(name.startswith("model.visual.deepstack_merger_list.") for name in sent)
    engine.update_weights(iter_checkpoint_buckets(other, bucket_bytes=4096))
    got = engine.get_weights(list(sent))
    for name, tensor in sent.items():
        assert got[name].device.type == "cpu" and torch.equal(got[name], tensor), name
    with pytest.raises(RolloutError, match="model.language_model.layers.99.mlp.up_proj.weight"):
        engine.update_weights([[("model.language_model.layers.99.mlp.up_proj.weight", torch.zeros(1))]])
    with pytest.raises(RolloutError, match="model.language_model.norm.weight"):
        engine.update_weights([[("model.language_model.norm.weight", torch.zeros(3))]])


def test_tied_embeddings_share_one_tensor(tmp_path):
    """With tie_word_embeddings (Qwen3-VL 2B/4B) lm_head.weight resolves to the embedding table: a checkpoint
    without lm_head.weight fills both."""
    tied = build_tiny_checkpoint(str(tmp_path / "tied"), seed=2, tie_word_embeddings=True)
    engine = EmbeddedEngine(tied, "cpu", torch.float32, max_batch_size=2)
    engine.load_checkpoint()
    got = engine.get_weights(["lm_head.weight", "model.language_model.embed_tokens.weight"])
    assert torch.equal(got["lm_head.weight"], got["model.language_model.embed_tokens.weight"])


def test_malformed_image_prompts_are_reported_by_request(engine, requests):
    """A prompt whose pads do not match its grid, or whose grid disagrees with its pad runs, raises
    RolloutError naming the request."""
    image = requests[0]
    short = RolloutRequest(list(image.prompt_ids)[:-7] + list(image.prompt_ids)[-5:], image.pixel_values,
                           image.image_grid_thw)
    with pytest.raises(RolloutError, match=re.escape("request 1 has 3 <|image_pad|>")):
        engine.generate([requests[1], short], SamplingParams(max_new_tokens=2))
    regridded = RolloutRequest(image.prompt_ids, image.pixel_values, torch.tensor([[4, 1, 4]]))
    with pytest.raises(RolloutError, match="request 0: a run of 4 image/video-pad tokens"):
        engine.generate([regridded], SamplingParams(max_new_tokens=2))

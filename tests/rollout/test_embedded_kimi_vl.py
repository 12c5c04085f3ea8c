"""The embedded engine on a tiny Kimi-VL (CPU, fp32): log-probs and greedy tokens equal transformers'
DeepseekV3ForCausalLM with MoonViT features at the media placeholders, weights under the published
per-expert names, and malformed image prompts reported by request."""
import dataclasses
import os
import re

import pytest
import torch

from mmrl_megatron.models.kimi_vl.tiny import MEDIA_PLACEHOLDER_TOKEN_ID as MEDIA
from mmrl_megatron.models.kimi_vl.tiny import build_tiny_checkpoint
from mmrl_megatron.rollout import RolloutError, RolloutRequest, SamplingParams
from mmrl_megatron.rollout.embedded import EmbeddedEngine
from mmrl_megatron.rollout.embedded.weights import iter_checkpoint_buckets

GRIDS = [(4, 6), None, (4, 4)]  # patches per image (2x2 merge: 6 and 4 placeholders), and a text-only prompt


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_tiny_checkpoint(str(tmp_path_factory.mktemp("kimi_vl_engine")), seed=3)


@pytest.fixture(scope="module")
def engine(checkpoint):
    engine = EmbeddedEngine(checkpoint, "cpu", torch.float32, max_batch_size=8)
    engine.load_checkpoint()
    return engine


def kimi_requests(grids, seed: int = 0):
    """Per grid: text, one image's placeholders (one per merged 2x2 patch block), text; None: text only."""
    generator = torch.Generator().manual_seed(seed)
    requests = []
    for grid in grids:
        text = torch.randint(3, 240, (5,), generator=generator).tolist()
        if grid is None:
            requests.append(RolloutRequest([0] + text))
            continue
        rows, cols = grid
        pixels = torch.randn(rows * cols, 3, 14, 14, generator=generator)
        requests.append(RolloutRequest([0] + text[:2] + [MEDIA] * (rows * cols // 4) + text[2:], pixels,
                                       torch.tensor([[1, rows, cols]])))
    return requests


@pytest.fixture(scope="module")
def oracle(checkpoint):
    """transformers' DeepseekV3ForCausalLM reading the checkpoint's language_model.* tensors (its own loader
    fuses the per-expert tensors), plus MoonViT + projector for the image features."""
    from safetensors.torch import load_file, save_file
    from transformers import DeepseekV3ForCausalLM

    from mmrl_megatron.models.hf_config import read_hf_config
    from mmrl_megatron.models.kimi_vl.hf_config import kimi_vl_config_from_dict
    from mmrl_megatron.models.kimi_vl.vision import MoonViT, MultiModalProjector

    kimi = kimi_vl_config_from_dict(read_hf_config(checkpoint))
    state = load_file(os.path.join(checkpoint, "model.safetensors"))
    language_dir = os.path.join(checkpoint, "language_only")
    os.makedirs(language_dir, exist_ok=True)
    save_file({name[len("language_model."):]: tensor for name, tensor in state.items()
               if name.startswith("language_model.")}, os.path.join(language_dir, "model.safetensors"),
              metadata={"format": "pt"})
    kimi.text.save_pretrained(language_dir)
    language = DeepseekV3ForCausalLM.from_pretrained(language_dir, dtype=torch.float32).eval()
    tower, projector = MoonViT(kimi.vision), MultiModalProjector(kimi.vision, kimi.text.hidden_size)
    for prefix, module in (("vision_tower.", tower), ("multi_modal_projector.", projector)):
        module.load_state_dict({name[len(prefix):]: t for name, t in state.items() if name.startswith(prefix)})

    @torch.no_grad()
    def logits(request: RolloutRequest, response_ids) -> torch.Tensor:
        """fp32 logits predicting each response token [R, vocab]."""
        ids = torch.tensor([list(request.prompt_ids) + list(response_ids)])
        embeddings = language.get_input_embeddings()(ids)
        if request.pixel_values is not None:
            features = projector(tower(request.pixel_values, request.image_grid_thw))
            embeddings = embeddings.masked_scatter((ids == MEDIA).unsqueeze(-1), features)
        return language(inputs_embeds=embeddings).logits[0, len(request.prompt_ids) - 1:-1]

    return logits


def _sampling(**overrides):
    return SamplingParams(**{**dict(n=2, temperature=0.8, max_new_tokens=8, seed=5, ignore_eos=True), **overrides})


def test_logprobs_equal_transformers_forward(engine, oracle):
    """Invariant: the engine's log-probs of its samples equal log_softmax(logits/T) of transformers' own
    forward over prompt + response within 1e-5 (fp32), for prompts with images of two sizes and text only."""
    requests = kimi_requests(GRIDS)
    sampling = _sampling(top_k=50)
    results = engine.generate(requests, sampling)
    assert [(r.request_index, r.sample_index) for r in results] == [(i, s) for i in range(3) for s in range(2)]
    for result in results:
        assert len(result.logprobs) == 8
        scaled = oracle(requests[result.request_index], result.response_ids) / sampling.temperature
        expected = torch.log_softmax(scaled, -1).gather(-1, torch.tensor(result.response_ids)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(result.logprobs), expected, rtol=0, atol=1e-5)


def test_greedy_follows_transformers_argmax_and_slots_are_independent(checkpoint, engine, oracle):
    """Invariant: at temperature 0 each token is transformers' argmax; decoding through two slots (slot
    reuse, one request at a time) gives the same tokens as one roomy batch."""
    requests = kimi_requests(GRIDS, seed=1)
    greedy = _sampling(temperature=0.0, n=1)
    roomy = engine.generate(requests, greedy)
    for result in roomy:
        assert result.response_ids == oracle(requests[result.request_index], result.response_ids).argmax(-1).tolist()
    tight = EmbeddedEngine(checkpoint, "cpu", torch.float32, max_batch_size=2)
    tight.load_checkpoint()
    sampled = dataclasses.replace(greedy, temperature=1.0, n=2)
    assert [r.response_ids for r in tight.generate(requests, sampled)] == \
        [r.response_ids for r in engine.generate(requests, sampled)]


def test_weights_round_trip_under_published_names(checkpoint, tmp_path):
    """Invariant: update_weights takes every published tensor (per-expert gate/up/down_proj into
    transformers' fused experts, the router's e_score_correction_bias buffer, vision tower, projector) and
    get_weights returns exactly what was sent; unknown names and wrong shapes raise RolloutError."""
    other = build_tiny_checkpoint(str(tmp_path / "other"), seed=9)
    engine = EmbeddedEngine(checkpoint, "cpu", torch.float32, max_batch_size=2)
    sent = {name: tensor for bucket in iter_checkpoint_buckets(other, 4096) for name, tensor in bucket}
    engine.update_weights(iter_checkpoint_buckets(other, 4096))
    got = engine.get_weights(list(sent))
    assert [name for name, tensor in sent.items() if not torch.equal(got[name], tensor)] == []
    assert any(".mlp.experts.3.up_proj." in name for name in sent)
    assert any(".e_score_correction_bias" in name for name in sent)
    assert any(name.startswith("vision_tower.") for name in sent)
    with pytest.raises(RolloutError, match=re.escape("language_model.model.layers.1.mlp.experts.4.up_proj.weight")):
        engine.update_weights([[("language_model.model.layers.1.mlp.experts.4.up_proj.weight", torch.zeros(32, 64))]])
    with pytest.raises(RolloutError, match="language_model.model.norm.weight"):
        engine.update_weights([[("language_model.model.norm.weight", torch.zeros(3))]])


def test_media_placeholder_mismatch_is_reported(engine):
    """Invariant: a prompt whose <|media_pad|> count differs from its image grid's merged patches, or whose
    grid does not tile into the merge kernel, raises RolloutError naming the request."""
    good = kimi_requests([(4, 4)])[0]
    short = RolloutRequest(good.prompt_ids, good.pixel_values, torch.tensor([[1, 4, 6]]))
    with pytest.raises(RolloutError, match=re.escape("request 0 has 4 <|media_pad|> tokens but its image_grid_thw "
                                                     "implies 6")):
        engine.generate([short], _sampling())
    odd = RolloutRequest(good.prompt_ids, good.pixel_values[:15], torch.tensor([[1, 3, 5]]))
    with pytest.raises(RolloutError, match="request 0, image 0: patch grid 3x5"):
        engine.generate([odd], _sampling())

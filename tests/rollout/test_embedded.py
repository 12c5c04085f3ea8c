"""The embedded engine on CPU: exact log-probs against HF, sampling controls, batching, weights and memory."""
import dataclasses
import re

import pytest
import torch

from mmrl_megatron.config.schema import Config, EmbeddedEngineConfig
from mmrl_megatron.models.qwen2_5_vl.tiny import build_tiny_checkpoint, load_tiny_tokenizer
from mmrl_megatron.rollout import RolloutError, RolloutRequest, SamplingParams, build_engine
from mmrl_megatron.rollout.embedded import EmbeddedEngine
from mmrl_megatron.models.common.kv_cache import StaticKVCache
from mmrl_megatron.rollout.embedded.generation import GenerationRun
from mmrl_megatron.rollout.embedded.graphs import batch_bucket, kv_bucket
from mmrl_megatron.models.qwen2_5_vl.embedded_vision import use_fast_vision_blocks
from mmrl_megatron.rollout.embedded.weights import iter_checkpoint_buckets

from .embedded_helpers import hf_logits, hf_logprobs, make_requests, make_video_request

GRIDS = [[1, 4, 4], None, [1, 4, 6]]  # two image sizes and a text-only prompt


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny_vl")))


@pytest.fixture(scope="module")
def hf_model(checkpoint):
    from transformers import Qwen2_5_VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def engine(checkpoint):
    engine = EmbeddedEngine(checkpoint, "cpu", torch.float32, max_batch_size=16)
    engine.load_checkpoint()
    return engine


@pytest.fixture(scope="module")
def requests(hf_model):
    return make_requests(hf_model.config, GRIDS)


def _sampling(**overrides):
    return SamplingParams(**{**dict(n=2, temperature=0.8, max_new_tokens=10, seed=11, ignore_eos=True), **overrides})


def _assert_same_results(results, expected, atol: float = 1e-5) -> None:
    """Every result names the same sample, with the same tokens and finish reason, and log-probs within atol."""
    assert len(results) == len(expected)
    for a, b in zip(results, expected):
        assert (a.request_index, a.sample_index, a.response_ids, a.finish_reason) == \
            (b.request_index, b.sample_index, b.response_ids, b.finish_reason)
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), rtol=0, atol=atol)


def test_logprobs_equal_a_separate_hf_forward(engine, hf_model, requests):
    """Returned log-probs equal HF's log_softmax(logits/T) over prompt+response within 1e-5 (fp32), for
    prompts with images of different sizes and a text-only prompt, with top-k/top-p active."""
    sampling = _sampling(top_p=0.9, top_k=40)
    results = engine.generate(requests, sampling)
    assert [(r.request_index, r.sample_index) for r in results] == [(i, s) for i in range(3) for s in range(2)]
    for result in results:
        assert len(result.response_ids) == len(result.logprobs) == 10 and result.finish_reason == "length"
        expected = hf_logprobs(hf_model, requests[result.request_index], result, sampling.temperature)
        torch.testing.assert_close(torch.tensor(result.logprobs), expected, rtol=0, atol=1e-5)


def test_video_prompt_logprobs_equal_a_separate_hf_forward(engine, hf_model, requests):
    """A prompt with a video of 4 temporal patches (then an image) decodes with log-probs equal to HF's forward
    given pixel_values_videos and second_per_grid_ts (1e-5, fp32), batched with image and text prompts."""
    video = make_video_request(hf_model.config, [4, 4, 4], [1, 4, 4], second_per_grid_t=2 / 3, seed=5)
    batch = [requests[0], video, requests[1]]
    sampling = _sampling(seed=4)
    results = engine.generate(batch, sampling)
    assert sorted({r.request_index for r in results}) == [0, 1, 2]
    pads = {hf_model.config.image_token_id, hf_model.config.video_token_id}
    assert not any(pads & set(r.response_ids) for r in results), "HF's forward would take a sampled pad for a patch"
    for result in results:
        expected = hf_logprobs(hf_model, batch[result.request_index], result, sampling.temperature)
        torch.testing.assert_close(torch.tensor(result.logprobs), expected, rtol=0, atol=1e-5)


def test_length_grouped_vision_attention_equals_hf_per_window(checkpoint):
    """The engine's batched window attention gives HF's vision features (per-window SDPA) within 1e-5,
    for images whose windows have several different sizes."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()
    requests = make_requests(model.config, [[1, 4, 6], [1, 10, 6], [1, 4, 4]])
    pixel_values = torch.cat([r.pixel_values for r in requests])
    grid = torch.cat([r.image_grid_thw for r in requests])

    def features():
        with torch.no_grad():
            output = model.model.get_image_features(pixel_values, grid)
        return torch.cat(list(getattr(output, "pooler_output", output)))

    expected = features()
    use_fast_vision_blocks(model)
    torch.testing.assert_close(features(), expected, rtol=0, atol=1e-5)


def test_vision_tower_reads_its_window_bounds_once_per_forward(checkpoint, monkeypatch):
    """The fast blocks read each of the tower's two boundary tensors (windows, whole images) to the host once
    per forward, not once per block (on a GPU every read waits for the queued work)."""
    from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration

    from mmrl_megatron.models.qwen2_5_vl import embedded_vision

    config = AutoConfig.from_pretrained(checkpoint)
    config.vision_config.depth, config.vision_config.fullatt_block_indexes = 4, [1, 3]  # two blocks of each kind
    model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=torch.float32).eval()
    use_fast_vision_blocks(model)
    [request] = make_requests(model.config, [[1, 10, 6]])
    reads = []
    original = embedded_vision.packed_segments
    monkeypatch.setattr(embedded_vision, "packed_segments", lambda bounds, device: reads.append(bounds) or
                        original(bounds, device))
    with torch.no_grad():
        model.model.get_image_features(request.pixel_values, request.image_grid_thw)
    assert len(reads) == 2 and reads[0] != reads[1]


def test_greedy_follows_hf_argmax(engine, hf_model, requests):
    """At temperature 0 every response token is HF's argmax given the prompt and the tokens before it."""
    for result in engine.generate(requests, _sampling(temperature=0.0, n=1)):
        logits = hf_logits(hf_model, requests[result.request_index], result.response_ids)
        assert result.response_ids == logits.argmax(-1).tolist()


def test_samples_are_independent_reproducible_and_batch_invariant(checkpoint, engine, requests):
    """n samples of a prompt differ; a seed reproduces them; a sample does not depend on its batch mates
    (a request alone, or decoded through few slots with slot reuse, gives the same tokens)."""
    sampling = _sampling(n=3, temperature=1.0)
    results = engine.generate(requests, sampling)
    samples_of_first = [tuple(r.response_ids) for r in results if r.request_index == 0]
    assert len(set(samples_of_first)) == 3
    assert [r.response_ids for r in engine.generate(requests, sampling)] == [r.response_ids for r in results]
    other_seed = engine.generate(requests, dataclasses.replace(sampling, seed=12))
    assert [r.response_ids for r in other_seed] != [r.response_ids for r in results]

    small = EmbeddedEngine(checkpoint, "cpu", torch.float32, max_batch_size=4,
                           settings=EmbeddedEngineConfig(prefill_tokens=8))
    small.load_checkpoint()
    squeezed = small.generate(requests, sampling)  # one request at a time, slots reused
    assert [r.response_ids for r in squeezed] == [r.response_ids for r in results]
    for a, b in zip(squeezed, results):
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), rtol=0, atol=1e-5)


def test_continuous_batching_matches_roomy_batch_when_sequences_end_early(checkpoint, engine, requests):
    """With two slots, sequences that stop early free their slot for the next prompt mid-run; every result
    (tokens, log-probs, finish reason) equals the run where all sequences fit at once."""
    sampling = _sampling(n=2, temperature=1.0, max_new_tokens=12)
    probe = engine.generate(requests, sampling)
    stop_token = probe[0].response_ids[2]  # ends that sample early; others run on or stop elsewhere
    sampling = dataclasses.replace(sampling, stop_token_ids=[stop_token])
    roomy = engine.generate(requests, sampling)
    tight = EmbeddedEngine(checkpoint, "cpu", torch.float32, max_batch_size=2)
    tight.load_checkpoint()
    squeezed = tight.generate(requests * 2, sampling)[:len(roomy)]
    assert {len(r.response_ids) for r in roomy} != {12}  # some sequences really did end early
    _assert_same_results(squeezed, roomy)


def test_long_tail_moves_down_to_low_slots_and_keeps_every_result(checkpoint, requests, monkeypatch):
    """Per-request budgets make a long tail: when the sequences still running would fit a smaller batch bucket,
    they move down to the low slots (cache and sampling state), and every result equals the same call decoded
    without moving (every step over the slots up to the highest running one)."""
    budgets = [12, 2, 3, 2]
    tailed = [dataclasses.replace(request, max_new_tokens=budget) for request, budget in zip(requests * 2, budgets)]
    sampling = _sampling(n=2, temperature=1.0, max_new_tokens=5)
    engine = EmbeddedEngine(checkpoint, "cpu", torch.float32, max_batch_size=8)
    engine.load_checkpoint()
    with monkeypatch.context() as patch:
        patch.setattr(GenerationRun, "_compacted", lambda run, active: active)
        expected = engine.generate(tailed, sampling)
    moves = []
    original = StaticKVCache.move_slots
    monkeypatch.setattr(StaticKVCache, "move_slots",
                        lambda cache, sources, targets: (moves.append(sources.tolist()), original(cache, sources, targets)))
    moved = engine.generate(tailed, sampling)
    assert moves  # the 12-token request's samples were left in high slots and moved down
    assert [len(r.response_ids) for r in moved] == [budget for budget in budgets for _ in range(2)]
    _assert_same_results(moved, expected)


def test_static_batches_give_the_continuous_results(checkpoint, requests):
    """With continuous batching off, a batch fills the empty cache and every one of its decode steps covers
    its full width until its longest response ends (padded, as HF generate batches); the next batch is
    admitted only then, and every result equals the continuous run's."""
    sampling = _sampling(n=2, temperature=1.0, max_new_tokens=6)
    tailed = [dataclasses.replace(request, max_new_tokens=budget) for request, budget in zip(requests, [6, 2, 4])]
    runs, widths = {}, {}
    for continuous in (True, False):
        engine = EmbeddedEngine(checkpoint, "cpu", torch.float32, max_batch_size=4,
                                settings=EmbeddedEngineConfig(continuous_batching=continuous))
        engine.load_checkpoint()
        exact_step = engine._decode_step
        widths[continuous] = []

        def recorded_step(cache, params, exact_step=exact_step, widths=widths[continuous]):
            step = exact_step(cache, params)
            return lambda batch, kv_len: (widths.append(batch), step(batch, kv_len))[1]

        engine._decode_step = recorded_step
        runs[continuous] = engine.generate(tailed, sampling)
    # static: requests 0-1 (budgets 6, 2) fill the 4 slots for 5 steps (the first token comes from the prefill),
    # then request 2 (budget 4) runs alone on 2 slots for 3 steps
    assert widths[False] == [4] * 5 + [2] * 3
    assert len(widths[True]) < len(widths[False])
    _assert_same_results(runs[False], runs[True])


def test_bucketed_decode_as_graphs_replay_it_matches_exact_decode(engine, requests, monkeypatch):
    """Decoding whole batch and KV-length buckets, as a captured CUDA graph replays it (idle slots and
    unused cache positions included, masked), gives the same rollout as the exact-size step."""
    sampling = _sampling(n=3, temperature=1.0, stop_token_ids=[7, 8, 9, 10])
    exact = engine.generate(requests, sampling)

    def bucketed_step(cache, params):
        def step(batch, kv_len):
            geometry = cache.geometry
            engine._sampler.decode_step(engine.decoder, cache, params, batch_bucket(batch, geometry.slots),
                                        kv_bucket(kv_len, geometry.max_len))
        return step

    monkeypatch.setattr(engine, "_decode_step", bucketed_step)
    padded = engine.generate(requests, sampling)
    _assert_same_results(padded, exact)


def test_steps_launched_ahead_of_the_finish_flags_change_no_result(engine, requests, monkeypatch):
    """The next decode step is launched before the host learns which sequences the running one ended; a
    sequence a stop token ended is inactive by then, so the step launched ahead leaves it as it was, and every
    result (tokens, log-probs, finish reasons) equals the step-by-step loop's."""
    sampling = _sampling(n=3, temperature=1.0, max_new_tokens=12, stop_token_ids=list(range(40, 80)))
    with monkeypatch.context() as patch:
        patch.setattr(GenerationRun, "_may_overlap", lambda run, waiting: False)
        expected = engine.generate(requests, sampling)
    ahead = []
    launch = GenerationRun._launch_step
    monkeypatch.setattr(GenerationRun, "_launch_step",
                        lambda run, move_slots: (ahead.append(not move_slots), launch(run, move_slots))[1])
    overlapped = engine.generate(requests, sampling)
    assert any(ahead)
    stopped = [r for r in expected if r.finish_reason == "stop" and len(r.response_ids) < sampling.max_new_tokens]
    assert len(stopped) >= 2  # stop tokens ended sequences while others ran on
    _assert_same_results(overlapped, expected, atol=1e-6)


def test_an_empty_cache_takes_every_prompt_that_fits_before_its_first_step(checkpoint, requests):
    """With a prefill budget of one prompt per admission, the 3 prompts (n=2) are prefilled one by one before
    the first decode step, since no decoding waits on them, and their 10 forced tokens then take 9 steps of
    all 6 samples (the first token comes from each prefill). Prompts that wait for room join while the batch
    decodes (test_admissions_wait_for_room_for_several_prompts_and_change_no_result)."""
    longest = max(len(request.prompt_ids) for request in requests)
    engine = EmbeddedEngine(checkpoint, "cpu", torch.float32, max_batch_size=8,
                            settings=EmbeddedEngineConfig(prefill_tokens=longest))
    engine.load_checkpoint()
    exact_step, events, prefill = engine._decode_step, [], engine.decoder.prefill

    def recorded_step(cache, params):
        step = exact_step(cache, params)
        return lambda batch, kv_len: (events.append(("step", batch)), step(batch, kv_len))[1]

    engine._decode_step = recorded_step
    engine.decoder.prefill = lambda embeds, *args: (events.append(("prefill", embeds.shape[0])),
                                                    prefill(embeds, *args))[1]
    results = engine.generate(requests, _sampling(n=2, max_new_tokens=10))
    assert [len(result.response_ids) for result in results] == [10] * 6
    assert events == [("prefill", 1)] * 3 + [("step", 6)] * 9


def test_admissions_wait_for_room_for_several_prompts_and_change_no_result(checkpoint, hf_model):
    """Continuous batching admits waiting prompts once free slots take admission_prompts of them (or all that
    wait), never waiting for more than half the prompts the cache holds: with 8 slots, n=2 and budgets
    2, 3, 4, 9, 9, 9, 9, prompts 4 and 5 are prefilled together once prompts 0 and 1 have ended, and prompt 6
    after prompt 2, also when 8 at a time are asked for; every result is the same as with admissions of one."""
    budgets = [2, 3, 4, 9, 9, 9, 9]
    requests = [dataclasses.replace(request, max_new_tokens=budget)
                for request, budget in zip(make_requests(hf_model.config, GRIDS + [None] * 4), budgets)]
    results, groups = {}, {}
    for admission_prompts in (1, 2, 8):
        engine = EmbeddedEngine(checkpoint, "cpu", torch.float32, max_batch_size=8,
                                settings=EmbeddedEngineConfig(admission_prompts=admission_prompts))
        engine.load_checkpoint()
        sizes, prefill = [], engine.decoder.prefill
        engine.decoder.prefill = lambda embeds, *args, sizes=sizes, prefill=prefill: (
            sizes.append(embeds.shape[0]), prefill(embeds, *args))[1]
        results[admission_prompts] = engine.generate(requests, _sampling(n=2, max_new_tokens=9))
        groups[admission_prompts] = sizes
    assert groups == {1: [4, 1, 1, 1], 2: [4, 2, 1], 8: [4, 2, 1]}
    assert [len(result.response_ids) for result in results[2]] == [budget for budget in budgets for _ in range(2)]
    _assert_same_results(results[2], results[1])
    _assert_same_results(results[8], results[1])


def test_stop_token_ends_the_sequence_and_is_included(engine, requests):
    """A stop token ends its sequence with finish_reason 'stop' and is the response's last token;
    without it the sequence runs to max_new_tokens with finish_reason 'length'."""
    greedy = _sampling(temperature=0.0, n=1)
    free_run = engine.generate(requests[:1], greedy)[0]
    assert free_run.finish_reason == "length" and len(free_run.response_ids) == greedy.max_new_tokens
    stop_token = free_run.response_ids[3]
    first_stop = free_run.response_ids.index(stop_token)
    stopped = engine.generate(requests[:1], dataclasses.replace(greedy, stop_token_ids=[stop_token]))[0]
    assert stopped.finish_reason == "stop"
    assert stopped.response_ids == free_run.response_ids[:first_stop + 1]
    assert stopped.logprobs == pytest.approx(free_run.logprobs[:first_stop + 1], abs=1e-6)


def test_stop_string_ends_the_sequence(checkpoint, engine, requests):
    """A stop string ends the sequence at the token that completes it (that token included)."""
    tokenizer = load_tiny_tokenizer(checkpoint)
    greedy = _sampling(temperature=0.0, n=1, max_new_tokens=12)
    free_run = engine.generate(requests[1:2], greedy)[0]
    text = tokenizer.decode(free_run.response_ids)
    stop_text = text[4:6]
    stopped = engine.generate(requests[1:2], dataclasses.replace(greedy, stop=[stop_text]))[0]
    assert stopped.finish_reason == "stop"
    assert stop_text in tokenizer.decode(stopped.response_ids)
    assert stop_text not in tokenizer.decode(stopped.response_ids[:-1])
    assert stopped.response_ids == free_run.response_ids[:len(stopped.response_ids)]


def test_end_of_sequence_stops_unless_ignored(engine, requests):
    """The model's eos id (config/generation_config) stops generation by default; ignore_eos disables it."""
    eos = engine.model.config.text_config.eos_token_id
    greedy = _sampling(temperature=0.0, n=1, ignore_eos=True)
    free_run = engine.generate(requests[:1], greedy)[0]
    engine._end_of_sequence_ids = [free_run.response_ids[2]]  # pretend the third greedy token is the eos
    try:
        stopped = engine.generate(requests[:1], dataclasses.replace(greedy, ignore_eos=False))[0]
        ignored = engine.generate(requests[:1], greedy)[0]
    finally:
        engine._end_of_sequence_ids = [eos]
    assert stopped.finish_reason == "stop" and len(stopped.response_ids) <= 3
    assert ignored.response_ids == free_run.response_ids


def test_weights_round_trip_and_name_errors(checkpoint, tmp_path):
    """get_weights returns CPU copies equal to what update_weights received (HF names, tied embeddings
    included); unknown names and wrong shapes raise RolloutError naming the tensor."""
    other = build_tiny_checkpoint(str(tmp_path / "other"), seed=5)
    engine = EmbeddedEngine(checkpoint, "cpu", torch.float32, max_batch_size=2)
    with pytest.raises(RolloutError, match="before any weights"):
        engine.generate(make_requests(engine.model.config, [None]), _sampling())
    sent = {name: tensor for bucket in iter_checkpoint_buckets(other, bucket_bytes=4096) for name, tensor in bucket}
    engine.update_weights(iter_checkpoint_buckets(other, bucket_bytes=4096))
    got = engine.get_weights(list(sent) + ["lm_head.weight"])
    for name, tensor in sent.items():
        assert got[name].device.type == "cpu" and torch.equal(got[name], tensor), name
    assert torch.equal(got["lm_head.weight"], sent["model.embed_tokens.weight"])
    with pytest.raises(RolloutError, match="model.layers.99.mlp.up_proj.weight"):
        engine.update_weights([[("model.layers.99.mlp.up_proj.weight", torch.zeros(1))]])
    with pytest.raises(RolloutError, match="model.norm.weight"):
        engine.update_weights([[("model.norm.weight", torch.zeros(3))]])
    with pytest.raises(RolloutError, match="no tensor named"):
        engine.get_weights(["not.a.weight"])


def test_release_and_resume_memory_keep_results(engine, requests):
    """release_memory drops the KV cache; after resume_memory the same seed gives the same rollout."""
    before = engine.generate(requests, _sampling())
    engine.release_memory()
    assert engine._cache is None
    engine.resume_memory()
    after = engine.generate(requests, _sampling())
    assert [r.response_ids for r in after] == [r.response_ids for r in before]


def test_image_pad_count_mismatch_is_reported(engine, requests):
    """A request whose image pads do not match its image_grid_thw raises RolloutError naming the request."""
    broken = RolloutRequest(requests[0].prompt_ids, requests[0].pixel_values, torch.tensor([[1, 4, 8]]))
    with pytest.raises(RolloutError, match=re.escape("request 1 has 4 <|image_pad|>/<|video_pad|> tokens but its "
                                                     "image_grid_thw implies 8")):
        engine.generate([requests[1], broken], _sampling())


def test_build_engine_picks_the_embedded_backend(checkpoint):
    """build_engine returns an EmbeddedEngine with the configured dtype and batch size by default."""
    config = Config()
    config.model.dtype = "float32"
    config.rollout.max_batch_size = 8
    engine = build_engine(config, checkpoint, "cpu")
    assert isinstance(engine, EmbeddedEngine) and engine.max_batch_size == 8
    assert engine.model.lm_head.weight.dtype == torch.float32


def test_build_engine_hands_the_rollout_section_to_sglang(monkeypatch):
    """backend=sglang builds SGLangEngine(config.rollout, hf_dir, device), imported only then."""
    import mmrl_megatron.rollout.sglang as sglang_backend

    calls = []
    monkeypatch.setattr(sglang_backend, "SGLangEngine", lambda *args: calls.append(args) or "sglang engine")
    config = Config()
    config.rollout.backend = "sglang"
    assert build_engine(config, "/models/qwen", "cuda:0") == "sglang engine"
    assert calls == [(config.rollout, "/models/qwen", "cuda:0")]

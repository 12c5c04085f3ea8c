"""Contract tests of SGLangEngine against the fake SGLang 0.5.23 server (tests/rollout/fake_sglang_server.py)."""
import io

import pytest
import torch
from PIL import Image

from mmrl_megatron.config.schema import RolloutConfig
from mmrl_megatron.models.qwen2_5_vl.tiny import build_tiny_checkpoint
from mmrl_megatron.rollout.errors import RolloutError
from mmrl_megatron.rollout.sglang import SGLangEngine
from mmrl_megatron.rollout.types import RolloutRequest, SamplingParams
from tests.rollout.fake_sglang_server import EOS_TOKEN_ID, InProcessLauncher, checkpoint_tensors

VISION_START, IMAGE_PAD, VISION_END = 259, 261, 260


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return build_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny_qwen")), seed=0)


def png_bytes(color) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (28, 28), color).save(buffer, format="PNG")
    return buffer.getvalue()


def image_request(text: bytes, color) -> RolloutRequest:
    prompt = list(text) + [VISION_START] + [IMAGE_PAD] * 4 + [VISION_END]
    return RolloutRequest(prompt_ids=prompt, images=[png_bytes(color)])


def rollout_config(**sglang_overrides) -> RolloutConfig:
    config = RolloutConfig(backend="sglang")
    config.sglang.max_retries = 0
    config.sglang.retry_backoff_s = 0.01
    config.sglang.max_concurrent_requests = 4
    for key, value in sglang_overrides.items():
        setattr(config.sglang, key, value)
    return config


def make_engine(hf_dir, tp_size=1, crash_plan=(), **sglang_overrides):
    # the fake runs as the launcher would start it: deterministic only with the flag
    launcher = InProcessLauncher(hf_dir, tp_size=tp_size, crash_plan=crash_plan,
                                 deterministic_inference=sglang_overrides.get("deterministic_inference", False))
    engine = SGLangEngine(rollout_config(tensor_parallel=tp_size, **sglang_overrides), hf_dir, launcher=launcher)
    return engine, launcher


def bigram_logprobs(weights, prompt_last: int, response, temperature: float):
    """log softmax(E @ E[last] / T)[token] for each response token: the fake's model, recomputed here."""
    embed = weights["model.embed_tokens.weight"].float()
    expected, last = [], prompt_last
    for token in response:
        expected.append(float(torch.log_softmax(embed @ embed[last] / temperature, dim=-1)[token]))
        last = token
    return expected


def scaled_weights(launcher, factor: float):
    return [[(name, tensor * factor) for name, tensor in launcher.server.weights.items()]]


def test_generation_with_images_returns_n_samples_and_tempered_logprobs(hf_dir):
    """n samples per image prompt, ordered (request, sample), with log-probs under the sampling temperature."""
    engine, launcher = make_engine(hf_dir, deterministic_inference=True)
    try:
        requests = [image_request(b"red?", "red"), image_request(b"blue?", "blue")]
        sampling = SamplingParams(n=3, temperature=0.7, max_new_tokens=6, seed=5)
        results = engine.generate(requests, sampling)
        assert [(r.request_index, r.sample_index) for r in results] == [(i, j) for i in range(2) for j in range(3)]
        weights = launcher.server.weights
        for result in results:
            assert 0 < len(result.response_ids) <= 6
            assert result.finish_reason == ("stop" if result.response_ids[-1] == EOS_TOKEN_ID else "length")
            prompt_last = requests[result.request_index].prompt_ids[-1]
            expected = bigram_logprobs(weights, prompt_last, result.response_ids, 0.7)
            assert result.logprobs == pytest.approx(expected, abs=1e-5)
        # every sample is its own /generate call carrying its images as data URLs and its own seed
        generate_calls = [body for route, body in launcher.server.calls if route == "/generate"]
        assert len(generate_calls) == 6
        assert all(body["image_data"][0].startswith("data:image/png;base64,") for body in generate_calls)
        assert len({body["sampling_params"]["sampling_seed"] for body in generate_calls}) == 6
        assert engine.generate(requests, sampling) == results  # fixed seed: same rollout
    finally:
        engine.shutdown()


def test_greedy_logprobs_are_at_temperature_one(hf_dir):
    """Temperature 0 is greedy; SGLang then reports log-probs at temperature 1, and so do we."""
    engine, launcher = make_engine(hf_dir)
    try:
        request = RolloutRequest(prompt_ids=list(b"hello"))
        (result,) = engine.generate([request], SamplingParams(temperature=0.0, max_new_tokens=4))
        expected = bigram_logprobs(launcher.server.weights, request.prompt_ids[-1], result.response_ids, 1.0)
        assert result.logprobs == pytest.approx(expected, abs=1e-5)
    finally:
        engine.shutdown()


def test_tensor_weight_update_in_a_session_with_one_payload_per_tp_rank(hf_dir):
    """Colocated sync: begin, one flattened-bucket payload per engine TP rank, end, flush; weights land."""
    engine, launcher = make_engine(hf_dir, tp_size=2)
    try:
        new = scaled_weights(launcher, 0.5)
        engine.update_weights(new)
        routes = [route for route, _ in launcher.server.calls]
        assert routes == ["/begin_weight_update", "/update_weights_from_tensor", "/end_weight_update", "/flush_cache"]
        body = launcher.server.calls[1][1]
        assert len(body["serialized_named_tensors"]) == 2
        assert body["load_format"] == "flattened_bucket" and body["weight_version"] == "1"
        for name, tensor in new[0]:
            assert torch.equal(launcher.server.weights[name], tensor)
    finally:
        engine.shutdown()


def test_distributed_weight_update_broadcasts_into_the_server(hf_dir):
    """Disaggregated sync: init group once, then names/dtypes/shapes + a broadcast per tensor, in a session."""
    engine, launcher = make_engine(hf_dir, tp_size=2, weight_sync="distributed", update_group_backend="gloo")
    try:
        for factor in (2.0, 3.0):
            new = scaled_weights(launcher, factor)
            engine.update_weights(new)
            for name, tensor in new[0]:
                assert torch.equal(launcher.server.weights[name], tensor)
        routes = [route for route, _ in launcher.server.calls]
        assert routes.count("/init_weights_update_group") == 1 and routes[0] == "/init_weights_update_group"
        init = dict(launcher.server.calls)["/init_weights_update_group"]
        assert (init["rank_offset"], init["world_size"], init["backend"]) == (1, 3, "gloo")
        update = dict(launcher.server.calls)["/update_weights_from_distributed"]
        assert update["dtypes"][0] == "float32" and len(update["names"]) == len(update["shapes"])
        assert routes[-3:] == ["/update_weights_from_distributed", "/end_weight_update", "/flush_cache"]
    finally:
        engine.shutdown()


def test_unknown_or_tied_names_are_caught_before_sglang_skips_them(hf_dir):
    """A name SGLang would skip silently (wrong prefix, or lm_head of a tied checkpoint) raises RolloutError."""
    engine, launcher = make_engine(hf_dir)
    try:
        norm = launcher.server.weights["model.norm.weight"]
        with pytest.raises(RolloutError, match="model.language_model.norm.weight"):
            engine.update_weights([[("model.language_model.norm.weight", norm + 1)]])
        embed = launcher.server.weights["model.embed_tokens.weight"]
        with pytest.raises(RolloutError, match="ties embeddings"):
            engine.update_weights([[("lm_head.weight", embed)]])
        assert torch.equal(launcher.server.weights["model.norm.weight"], norm)
        engine.update_weights([[("model.norm.weight", norm + 1)]])  # the session was closed after each failure
        assert torch.equal(launcher.server.weights["model.norm.weight"], norm + 1)
    finally:
        engine.shutdown()


def test_release_and_resume_memory_around_training(hf_dir):
    """release frees every tag; an update resumes weights first; resume brings back the rest before generating."""
    engine, launcher = make_engine(hf_dir)
    try:
        engine.release_memory()
        assert launcher.server.released == {"weights", "kv_cache", "cuda_graph"}
        with pytest.raises(RolloutError, match="memory released"):
            engine.generate([RolloutRequest(prompt_ids=[1, 2])], SamplingParams(max_new_tokens=2))
        engine.update_weights(scaled_weights(launcher, 1.0))
        assert launcher.server.released == {"kv_cache", "cuda_graph"}
        engine.resume_memory()
        assert launcher.server.released == set()
        assert len(engine.generate([RolloutRequest(prompt_ids=[1, 2])], SamplingParams(max_new_tokens=2))) == 1
        resumes = [body["tags"] for route, body in launcher.server.calls if route == "/resume_memory_occupation"]
        assert resumes == [["weights"], ["cuda_graph", "kv_cache"]]
    finally:
        engine.shutdown()


def test_server_crash_mid_rollout_restarts_resyncs_and_keeps_completed_samples(hf_dir):
    """A crash after 3 answers: restart, re-sync the last weights, resend only the unanswered samples."""
    engine, launcher = make_engine(hf_dir, crash_plan=[3], max_restarts=1, deterministic_inference=True)
    try:
        synced = scaled_weights(launcher, 0.25)
        engine.update_weights(synced)
        requests = [RolloutRequest(prompt_ids=[10 + i, 20 + i]) for i in range(4)]
        sampling = SamplingParams(n=2, temperature=1.0, max_new_tokens=3, seed=1)
        results = engine.generate(requests, sampling)
        assert len(launcher.servers) == 2 and launcher.servers[0].crashed
        first, second = launcher.servers
        assert first.generates_served == 3 and second.generates_served == 8 - 3
        for name, tensor in synced[0]:
            assert torch.equal(second.weights[name], tensor)  # re-synced, not the checkpoint's weights
        assert [(r.request_index, r.sample_index) for r in results] == [(i, j) for i in range(4) for j in range(2)]
        reference, _ = make_engine(hf_dir, deterministic_inference=True)
        try:
            reference.update_weights(synced)
            assert reference.generate(requests, sampling) == results  # as if nothing had happened
        finally:
            reference.shutdown()
    finally:
        engine.shutdown()


def test_repeated_crashes_stop_the_run_with_the_server_log(hf_dir):
    """After max_restarts the error carries the server log's tail; a one-shot weight iterator cannot re-sync."""
    engine, launcher = make_engine(hf_dir, crash_plan=[0, 0], max_restarts=1)
    try:
        with pytest.raises(RolloutError, match="max_restarts=1(.|\n)*fake server"):
            engine.generate([RolloutRequest(prompt_ids=[1, 2])], SamplingParams(max_new_tokens=2))
    finally:
        engine.shutdown()
    engine, launcher = make_engine(hf_dir, crash_plan=[0], max_restarts=1)
    try:
        engine.update_weights(iter(scaled_weights(launcher, 1.0)))
        with pytest.raises(RolloutError, match="one-shot iterator"):
            engine.generate([RolloutRequest(prompt_ids=[1, 2])], SamplingParams(max_new_tokens=2))
    finally:
        engine.shutdown()


def _two_rank_group_body(hf_dir):
    """Rank 0 leads a TP-2 group with rank 1; returns what each rank saw."""
    import torch.distributed as dist

    rank = dist.get_rank()
    launcher = InProcessLauncher(hf_dir, tp_size=2) if rank == 0 else None
    engine = SGLangEngine(rollout_config(tensor_parallel=2), hf_dir, launcher=launcher)
    try:
        requests = [RolloutRequest(prompt_ids=[30 + rank, 40 + index]) for index in range(rank + 1)]
        results = engine.generate(requests, SamplingParams(n=2, max_new_tokens=3, seed=7))
        weights = {name: tensor * (0.5 + rank) for name, tensor in checkpoint_tensors(hf_dir).items()}
        # each rank serializes its own copy; rank 1's values differ so the test can see whose entry loaded
        engine.update_weights([list(weights.items())])
        try:
            engine.update_weights([[("model.wrong.weight", weights["model.norm.weight"])]])
            name_error = None
        except RolloutError as error:
            name_error = str(error)
        received = [entry["model.norm.weight"] for entry in launcher.server.received_per_rank] if rank == 0 else None
        calls = [len(body["serialized_named_tensors"]) for route, body in launcher.server.calls
                 if route == "/update_weights_from_tensor"] if rank == 0 else None
        return {
            "results": [(r.request_index, r.sample_index, r.response_ids) for r in results],
            "prompts_last": [request.prompt_ids[-1] for request in requests],
            "name_error": name_error,
            "received_norms": received,
            "expected_norm": weights["model.norm.weight"],
            "payload_entries": calls,
        }
    finally:
        engine.shutdown()


def test_two_process_group_shares_one_server(hf_dir):
    """Members hand requests and weight payloads to the leader and get their own results and errors back."""
    from tests.cpu_ranks import run_on_cpu_ranks

    leader, member = run_on_cpu_ranks(2, _two_rank_group_body, hf_dir)
    assert [entry[:2] for entry in leader["results"]] == [(0, 0), (0, 1)]
    assert [entry[:2] for entry in member["results"]] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert leader["payload_entries"] == [1 * 2] * len(leader["payload_entries"])
    # one payload per engine rank, in group order: engine rank i reads process i's tensors
    assert not torch.equal(member["expected_norm"], leader["expected_norm"])
    assert torch.equal(leader["received_norms"][0], leader["expected_norm"])
    assert torch.equal(leader["received_norms"][1], member["expected_norm"])
    assert leader["name_error"] and leader["name_error"] == member["name_error"]


def test_update_group_store_listens_on_the_configured_address_only(hf_dir):
    """The weight-update group's store serves on update_group_address alone, not on every interface."""
    import psutil

    engine, launcher = make_engine(hf_dir, weight_sync="distributed", update_group_backend="gloo",
                                   update_group_address="127.0.0.1")
    try:
        engine.update_weights(scaled_weights(launcher, 1.0))
        port = dict(launcher.server.calls)["/init_weights_update_group"]["master_port"]
        listening = {conn.laddr.ip for conn in psutil.Process().net_connections("inet")
                     if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port}
        assert listening == {"127.0.0.1"}
    finally:
        engine.shutdown()


def test_groups_sharing_a_server_never_send_the_same_request_id(hf_dir):
    """Two engines on one user-started server generate the same prompts at once: SGLang refuses an id
    already in flight, so every request id must be unique per engine and call."""
    from concurrent.futures import ThreadPoolExecutor

    from tests.rollout.fake_sglang_server import FakeSGLangServer

    server = FakeSGLangServer(hf_dir, generate_delay_s=0.2).start()
    engines = [SGLangEngine(rollout_config(urls=[server.url]), hf_dir) for _ in range(2)]
    try:
        requests = [RolloutRequest(prompt_ids=[3, 4]), RolloutRequest(prompt_ids=[5, 6])]
        sampling = SamplingParams(n=2, max_new_tokens=2)
        with ThreadPoolExecutor(2) as pool:
            outcomes = list(pool.map(lambda engine: engine.generate(requests, sampling), engines))
        assert all(len(results) == 4 for results in outcomes)
        again = engines[0].generate(requests, sampling)  # a second call of the same engine: fresh ids too
        assert len(again) == 4
        rids = [body["rid"] for route, body in server.calls if route == "/generate"]
        assert len(rids) == 12 and len(set(rids)) == 12
    finally:
        for engine in engines:
            engine.shutdown()
        server.stop()


def test_a_retried_request_gets_a_fresh_id(hf_dir):
    """A request that timed out may still run on the server; its retry must not reuse the id."""
    from tests.rollout.fake_sglang_server import FakeSGLangServer

    server = FakeSGLangServer(hf_dir, generate_delay_s=1.0).start()
    engine = SGLangEngine(rollout_config(urls=[server.url], request_timeout_s=0.3, max_retries=3), hf_dir)
    try:
        sent = []
        original = server.route_generate

        def faster_after_first(body):
            sent.append(body["rid"])
            if len(sent) > 1:
                server.generate_delay_s = 0.0
            return original(body)

        server.route_generate = faster_after_first
        (result,) = engine.generate([RolloutRequest(prompt_ids=[7, 8])], SamplingParams(max_new_tokens=2))
        assert result.response_ids
        assert len(sent) >= 2 and len(set(sent)) == len(sent)
    finally:
        engine.shutdown()
        server.stop()


def test_seeds_reach_sglang_only_with_deterministic_inference(hf_dir):
    """SGLang honours sampling_seed only under --enable-deterministic-inference: with the config key the
    launcher passes the flag and a fixed seed repeats a rollout; without it no seed is sent at all."""
    from mmrl_megatron.rollout.sglang.launcher import launch_command

    requests = [RolloutRequest(prompt_ids=[11, 12])]
    sampling = SamplingParams(n=4, temperature=1.0, max_new_tokens=4, seed=9)
    config = rollout_config(deterministic_inference=True).sglang
    assert "--enable-deterministic-inference" in launch_command(config, hf_dir, "127.0.0.1", 1, 0)
    assert "--enable-deterministic-inference" not in launch_command(rollout_config().sglang, hf_dir, "127.0.0.1", 1, 0)
    engine, launcher = make_engine(hf_dir, deterministic_inference=True)
    try:
        assert engine.generate(requests, sampling) == engine.generate(requests, sampling)
        seeds = [body["sampling_params"]["sampling_seed"] for route, body in launcher.server.calls if route == "/generate"]
        assert len(seeds) == 8 and len(set(seeds)) == 4
    finally:
        engine.shutdown()
    engine, launcher = make_engine(hf_dir)
    try:
        engine.generate(requests, sampling)
        assert all("sampling_seed" not in body["sampling_params"]
                   for route, body in launcher.server.calls if route == "/generate")
    finally:
        engine.shutdown()


def test_the_fake_is_as_lenient_as_the_real_server(hf_dir):
    """Like 0.5.23 (tests/rollout/sglang_real): unknown body fields ignored, an unknown sampling key a 400,
    a missing required field a 422, /get_weights_by_name a 400 for this model family."""
    import requests as http

    from tests.rollout.fake_sglang_server import FakeSGLangServer

    server = FakeSGLangServer(hf_dir).start()
    try:
        ok = http.post(server.url + "/generate", json={"input_ids": [1, 2], "no_such_field": 1,
                                                       "sampling_params": {"max_new_tokens": 1}})
        assert ok.status_code == 200
        bad = http.post(server.url + "/generate", json={"input_ids": [1, 2], "sampling_params": {"max_tokens": 1}})
        assert bad.status_code == 400 and "max_tokens" in bad.text
        assert http.post(server.url + "/begin_weight_update", json={"selector": "all", "extra": 1}).status_code == 200
        assert http.post(server.url + "/update_weights_from_tensor", json={}).status_code == 422
        assert http.post(server.url + "/get_weights_by_name", json={"name": "model.norm.weight"}).status_code == 400
    finally:
        server.stop()

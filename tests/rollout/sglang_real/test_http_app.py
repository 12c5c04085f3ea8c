"""SGLangEngine driven against sglang 0.5.23's own FastAPI app (a stand-in tokenizer manager and model
below it, stand_in_server.py): routes, parsing, status codes and answers are the real server's."""
import pytest
import torch

from mmrl_megatron.models.qwen2_5_vl.tiny import build_tiny_checkpoint
from mmrl_megatron.rollout.errors import RolloutError
from mmrl_megatron.rollout.sglang import SGLangEngine
from mmrl_megatron.rollout.types import RolloutRequest, SamplingParams
from tests.rollout.sglang_real.stand_ins import require_sglang
from tests.rollout.test_sglang_engine import bigram_logprobs, image_request, rollout_config


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return build_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny_qwen")), seed=0)


@pytest.fixture
def app(hf_dir):
    from tests.rollout.sglang_real.stand_in_server import SGLangAppServer

    server = SGLangAppServer(require_sglang(), hf_dir)
    url = server.start()
    yield server, url
    server.stop()


def test_engine_syncs_generates_and_releases_through_sglangs_app(hf_dir, app):
    """A sync (begin, one tensor payload, end, flush), generation with an image and n samples, and
    release/resume, all through sglang's routes; the weights land bit-exact and log-probs are the model's."""
    server, url = app
    model = server.tokenizer_manager.model
    engine = SGLangEngine(rollout_config(urls=[url], deterministic_inference=True), hf_dir)
    try:
        synced = [(name, tensor * 0.5) for name, tensor in model.weights.items()]
        engine.update_weights([synced])
        for name, tensor in synced:
            assert torch.equal(model.weights[name], tensor), name
        requests = [image_request(b"red?", "red"), RolloutRequest(prompt_ids=list(b"plain"))]
        results = engine.generate(requests, SamplingParams(n=2, temperature=0.8, max_new_tokens=4, seed=3))
        assert [(r.request_index, r.sample_index) for r in results] == [(i, j) for i in range(2) for j in range(2)]
        for result in results:
            expected = bigram_logprobs(model.weights, requests[result.request_index].prompt_ids[-1],
                                       result.response_ids, 0.8)
            assert result.logprobs == pytest.approx(expected, abs=1e-5)
        parsed = [obj for obj in server.tokenizer_manager.requests if hasattr(obj, "input_ids")]
        assert len({obj.rid for obj in parsed}) == 4 and parsed[0].image_data[0].startswith("data:image/png;base64,")
        engine.release_memory()
        assert model.released == {"weights", "kv_cache", "cuda_graph"}
        engine.resume_memory()
        assert model.released == set()
    finally:
        engine.shutdown()


def test_a_duplicate_request_id_is_refused_by_sglangs_route(hf_dir, app):
    """The id collision that issue 17 found: sglang's route answers HTTP 400, and the client says so."""
    server, url = app
    model = server.tokenizer_manager.model
    model.rids_in_flight.add("taken")
    from mmrl_megatron.rollout.sglang.client import SGLangClient
    from mmrl_megatron.rollout.sglang.payloads import generate_payload

    client = SGLangClient(url, request_timeout_s=30, max_retries=0)
    try:
        with pytest.raises(RolloutError, match="HTTP 400(.|\n)*Duplicate request ID detected: taken"):
            client.generate(generate_payload(RolloutRequest(prompt_ids=[1, 2]), SamplingParams(max_new_tokens=2), "taken"))
    finally:
        client.close()


def test_multi_turn_requests_parse_as_sglangs_own_generate_requests(hf_dir, app):
    """Invariant: through sglang's own route and request parsing, each later turn of a multi-turn rollout arrives
    as a GenerateReqInput holding the whole conversation's input_ids and all of its images, in order."""
    from tests.rollout.test_sglang_multi_turn import expected_turn_requests, run_multi_turn

    server, url = app
    engine = SGLangEngine(rollout_config(urls=[url], deterministic_inference=True), hf_dir)
    try:
        requests, results = run_multi_turn(engine, hf_dir)
        parsed = [(obj.input_ids, obj.image_data) for obj in server.tokenizer_manager.requests
                  if hasattr(obj, "input_ids")]
        expected = expected_turn_requests(requests, results)
        assert max(len(images) for _, images in expected) == 3
        for item in expected:
            assert item in parsed
    finally:
        engine.shutdown()

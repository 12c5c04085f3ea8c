"""Multi-turn rollouts through the SGLang engine, against the fake SGLang 0.5.23 server: each later assistant turn
is one /generate request whose input_ids are the whole conversation so far and whose image_data are all of its
images in order; the engine's log-probs are kept for the generated tokens only."""
import pytest

from mmrl_megatron.data.turns import TurnEncoder
from mmrl_megatron.models.qwen2_5_vl.tiny import build_tiny_checkpoint
from mmrl_megatron.rollout.environments.scripted import ScriptedEnvironment
from mmrl_megatron.rollout.multi_turn import MultiTurnRollout
from mmrl_megatron.rollout.sglang.payloads import image_data_url
from mmrl_megatron.rollout.types import SamplingParams
from tests.rollout.multi_turn_helpers import png, processor_for, requests_for, scripted_prompts
from tests.rollout.test_sglang_engine import bigram_logprobs, make_engine

REPLIES = [{"text": "Zoomed in:", "images": [png(40, 30)]}, {"text": "And here:", "images": [png(30, 60)]}]
# every byte token stops a turn, so most turns are one token long and end by "stop"
SAMPLING = SamplingParams(n=2, temperature=1.0, max_new_tokens=4, stop_token_ids=list(range(256)), seed=1)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return build_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny_qwen")), seed=0)


def run_multi_turn(engine, hf_dir):
    """(prompts' requests, results) of a three-turn scripted rollout through `engine`."""
    processor = processor_for(hf_dir)
    prompts = scripted_prompts(processor, REPLIES)
    driver = MultiTurnRollout(engine, ScriptedEnvironment, TurnEncoder(processor), processor.tokenizer.decode, 3, 600,
                              "scripted")
    requests = requests_for(prompts)
    return requests, driver.generate(prompts, requests, SAMPLING)


def expected_turn_requests(requests, results):
    """(input_ids, image_data) of the /generate request of every assistant turn after the first."""
    expected = []
    for result in results:
        prompt, turns = requests[result.request_index], result.turns
        start, images = 0, list(prompt.images)
        for length, environment in zip(turns.generated_lengths, turns.environment_turns):
            start += length + len(environment.ids)
            images += environment.images
            urls = [image_data_url(image) for image in images]
            expected.append((prompt.prompt_ids + result.response_ids[:start], urls))
    return expected


def test_later_turns_are_requests_of_the_whole_conversation_with_every_image(hf_dir):
    """Invariant: every turn after the first is a /generate request of exactly prompt + response so far with all
    images so far as data URLs (the fake server refuses a request whose image count disagrees with its image
    spans); each generated token's log-prob is the server's (recomputed from its model), environment tokens'
    are 0."""
    engine, launcher = make_engine(hf_dir)
    try:
        requests, results = run_multi_turn(engine, hf_dir)
        sent = [(body["input_ids"], body.get("image_data")) for route, body in launcher.server.calls
                if route == "/generate"]
        expected = expected_turn_requests(requests, results)
        assert len(sent) == 4 + len(expected) and max(len(images) for _, images in expected) == 3
        for item in expected:
            assert item in sent
        for result in results:
            prompt_ids = requests[result.request_index].prompt_ids
            start = 0
            for index, length in enumerate(result.turns.generated_lengths):
                before = (prompt_ids + result.response_ids)[len(prompt_ids) + start - 1]
                generated = result.response_ids[start:start + length]
                assert result.logprobs[start:start + length] == pytest.approx(
                    bigram_logprobs(launcher.server.weights, before, generated, 1.0), abs=1e-5)
                start += length
                if index < len(result.turns.environment_turns):
                    environment = result.turns.environment_turns[index].ids
                    assert result.logprobs[start:start + len(environment)] == [0.0] * len(environment)
                    start += len(environment)
    finally:
        engine.shutdown()

"""The multi-turn driver (rollout/multi_turn.py): exact log-probs over whole conversations with the embedded
engine, the response layout, the turn and token budgets, and clear errors from misbehaving environments."""
import pytest
import torch

from mmrl_megatron.models.qwen2_5_vl.tiny import build_tiny_checkpoint
from mmrl_megatron.data.turns import TurnEncoder
from mmrl_megatron.rollout import RolloutError, RolloutRequest, RolloutResult, SamplingParams
from mmrl_megatron.rollout.environments import Environment, EnvironmentReply
from mmrl_megatron.rollout.environments.scripted import ScriptedEnvironment
from mmrl_megatron.rollout.multi_turn import MultiTurnRollout
from tests.rollout.embedded_helpers import hf_logprobs
from tests.rollout.multi_turn_helpers import (image_replies, processor_for, requests_for, scripted_prompts,
                                              stopping_sampling)

REPLIES = image_replies()
END_OF_TURN = 256  # the tiny tokenizer's <|im_end|>


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny_vl")))


@pytest.fixture(scope="module")
def processor(checkpoint):
    return processor_for(checkpoint)


def _driver(engine, processor, environment=ScriptedEnvironment, max_turns=3, max_total_tokens=400):
    return MultiTurnRollout(engine, environment, TurnEncoder(processor), lambda ids: processor.tokenizer.decode(ids),
                            max_turns, max_total_tokens, environment.__name__)


def test_engine_logprobs_equal_hf_over_the_whole_conversation(checkpoint, processor):
    """Invariant: with tool turns returning images, the embedded engine's log-prob of every generated token of
    every turn equals HF's own forward over prompt + whole response with all images (fp32, 1e-5), and the
    environment's tokens carry log-prob 0 and loss mask 0."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from mmrl_megatron.rollout.embedded import EmbeddedEngine

    engine = EmbeddedEngine(checkpoint, "cpu", torch.float32, max_batch_size=16)
    engine.load_checkpoint()
    hf_model = Qwen2_5_VLForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()
    prompts = scripted_prompts(processor, REPLIES)
    requests = requests_for(prompts)
    results = _driver(engine, processor).generate(prompts, requests, stopping_sampling())
    assert [(r.request_index, r.sample_index) for r in results] == [(i, s) for i in range(2) for s in range(2)]
    assert max(len(r.turns.generated_lengths) for r in results) == 3  # some conversations used both replies
    for result in results:
        turns, prompt = result.turns, requests[result.request_index]
        mask = torch.tensor(turns.loss_mask, dtype=torch.bool)
        assert len(mask) == len(result.response_ids) == len(result.logprobs)
        environment = turns.environment_turns
        whole = RolloutRequest(prompt.prompt_ids,
                               torch.cat([prompt.pixel_values] + [t.pixel_values for t in environment]),
                               torch.cat([prompt.image_grid_thw] + [t.image_grid_thw for t in environment]))
        expected = hf_logprobs(hf_model, whole, result, 1.0, given=(~mask).tolist())
        torch.testing.assert_close(torch.tensor(result.logprobs)[mask], expected[mask], rtol=0, atol=1e-5)
        assert not torch.tensor(result.logprobs)[~mask].any()


class RecordingEngine:
    """Answers every request with the same tokens (ending in <|im_end|>, a stop) and records each call."""

    def __init__(self, tokens=(72, 105, END_OF_TURN), finish_reason="stop"):
        self.tokens, self.finish_reason = list(tokens), finish_reason
        self.calls = []

    def generate(self, requests, sampling):
        self.calls.append((list(requests), sampling))
        return [RolloutResult(index, sample, self.tokens[:sampling.max_new_tokens],
                              [-1.0] * len(self.tokens[:sampling.max_new_tokens]),
                              self.finish_reason if len(self.tokens) <= sampling.max_new_tokens else "length")
                for index in range(len(requests)) for sample in range(sampling.n)]


def test_turn_layout_requests_and_engine_calls(processor):
    """Invariant: a response is assistant, environment, assistant, ... turns ending on an assistant turn; the mask
    is 1 exactly on the assistant tokens; each later request is the conversation so far with every image in
    order; later turns are seeded apart; and the engine is called max_turns times even after every conversation
    ended (engines whose generate is collective stay in step)."""
    prompts = scripted_prompts(processor, REPLIES[:1])
    requests = requests_for(prompts)
    engine = RecordingEngine()
    results = _driver(engine, processor, max_turns=4).generate(prompts, requests, SamplingParams(n=2, seed=3))
    assert len(engine.calls) == 4 and [len(call[0]) for call in engine.calls] == [2, 4, 0, 0]
    assert [call[1].seed for call in engine.calls][:2] == [3, engine.calls[1][1].seed] and engine.calls[1][1].seed != 3
    for result in results:
        turns = result.turns
        assert turns.generated_lengths == [3, 3] and len(turns.environment_turns) == 1
        environment_ids = turns.environment_turns[0].ids
        assert result.response_ids == engine.tokens + environment_ids + engine.tokens
        assert turns.loss_mask == [1] * 3 + [0] * len(environment_ids) + [1] * 3
    second = engine.calls[1][0][0]
    assert second.prompt_ids == requests[0].prompt_ids + engine.tokens + results[0].turns.environment_turns[0].ids
    assert second.images == requests[0].images + REPLIES[0]["images"]
    assert second.image_grid_thw.shape == (2, 3)
    assert torch.equal(second.image_grid_thw[0], requests[0].image_grid_thw[0])


def test_token_and_turn_budgets(processor):
    """Invariant: prompt + response never exceeds max_total_tokens (a cut turn or a reply that leaves no room ends
    the conversation as "length"); max_turns bounds the assistant turns; a turn cut at max_new_tokens ends it."""
    prompts = scripted_prompts(processor, REPLIES * 3, sizes=[(56, 56)])
    requests = requests_for(prompts)
    prompt_length = len(requests[0].prompt_ids)
    for max_total in (prompt_length + 2, prompt_length + 10, prompt_length + 40):
        [result] = _driver(RecordingEngine(), processor, max_turns=5, max_total_tokens=max_total).generate(
            prompts, requests, SamplingParams(n=1))
        assert prompt_length + len(result.response_ids) <= max_total
        assert result.finish_reason == "length" and result.turns.loss_mask[-1] == 1
    [result] = _driver(RecordingEngine(), processor, max_turns=2, max_total_tokens=1000).generate(
        prompts, requests, SamplingParams(n=1))
    assert len(result.turns.generated_lengths) == 2 and result.finish_reason == "stop"
    [result] = _driver(RecordingEngine(), processor, max_turns=3).generate(prompts, requests,
                                                                          SamplingParams(n=1, max_new_tokens=2))
    assert result.turns.generated_lengths == [2] and result.finish_reason == "length"


def test_an_assistant_turn_holding_an_image_token_ends_the_conversation(processor):
    """Invariant: a sampled image pad (an ordinary token in a response) is never sent back as part of a prompt,
    where the engines would read it as an image."""
    prompts = scripted_prompts(processor, REPLIES, sizes=[(56, 56)])
    engine = RecordingEngine(tokens=(72, processor.image_token_id, END_OF_TURN))
    [result] = _driver(engine, processor).generate(prompts, requests_for(prompts), SamplingParams(n=1))
    assert result.turns.generated_lengths == [3] and [len(call[0]) for call in engine.calls] == [1, 0, 0]


class Raising(Environment):
    def step(self, conversation):
        raise KeyError("no such tool")


class WrongType(Environment):
    def step(self, conversation):
        return "just a string"


class ImageTokenText(Environment):
    def step(self, conversation):
        return EnvironmentReply(text="look: <|image_pad|>")


@pytest.mark.parametrize("environment, message", [(Raising, "Raising' raised at request 0 sample 0.*no such tool"),
                                                  (WrongType, "must return an EnvironmentReply"),
                                                  (ImageTokenText, "literal image token <\\|image_pad\\|>")])
def test_a_misbehaving_environment_stops_with_one_clear_error(processor, environment, message):
    """Invariant: an environment that raises, returns something else than an EnvironmentReply, or writes an image
    token in its text stops the rollout with a RolloutError naming the environment and the trajectory."""
    prompts = scripted_prompts(processor, [], sizes=[(56, 56)])
    with pytest.raises(RolloutError, match=message):
        _driver(RecordingEngine(), processor, environment).generate(prompts, requests_for(prompts), SamplingParams(n=1))


def test_configuration_chooses_the_driver_or_says_what_is_wrong(processor):
    """Invariant: no environment keeps single-turn rollouts (no driver); a token budget that a prompt alone could
    fill, or DAPO's one-turn overlong shaping, is refused with one ConfigError naming the keys."""
    from mmrl_megatron.config import ConfigError, load_config
    from mmrl_megatron.rollout.multi_turn import build_multi_turn

    engine = RecordingEngine()
    assert build_multi_turn(load_config(None, []), engine, processor, str) is None
    config = load_config(None, ["rollout.multi_turn.environment=zoom", "rollout.multi_turn.max_total_tokens=1024",
                                "data.max_prompt_length=1024"])
    with pytest.raises(ConfigError, match="max_total_tokens=1024 must exceed data.max_prompt_length=1024"):
        build_multi_turn(config, engine, processor, str)
    config.rollout.multi_turn.max_total_tokens = 2048
    config.algorithm.overlong_buffer = 16
    with pytest.raises(ConfigError, match="algorithm.overlong_buffer"):
        build_multi_turn(config, engine, processor, str)
    config.algorithm.overlong_buffer = 0
    assert build_multi_turn(config, engine, processor, str).environment_class.__name__ == "ZoomEnvironment"

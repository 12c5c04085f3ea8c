"""The VLM judge reward: P(Yes) from a chat VLM given (prompt, images, response), batched with left padding."""
import pytest

from mmrl_megatron.config.schema import DataConfig, RewardConfig
from mmrl_megatron.data.format import make_row, parse_row
from mmrl_megatron.rewards import RewardError, RewardItem, build_reward_function
from mmrl_megatron.rewards.reward_model import RewardModelJudge
from tests.data.images import png


def _items():
    rows = [make_row("How many squares?", [png(56, 56)], "1", "s"), make_row("Describe.", [png(112, 56), png(56, 84)], "2", "s"),
            make_row("Text only question?", [], "3", "s")]
    responses = ["\\boxed{1}", "<think>two shapes, one tall</think> \\boxed{2}", "no"]
    return [RewardItem("s", response, row["reward_model"]["ground_truth"], {}, parse_row(row).messages,
                       [image["bytes"] for image in row["images"]]) for row, response in zip(rows, responses)]


def test_batched_judge_equals_one_at_a_time(tiny_model_dir):
    """Invariant: scores are probabilities, and a left-padded batch mixing 0, 1 and 2 images gives the same
    scores as scoring each item alone (padding and image bookkeeping do not leak across items)."""
    judge = RewardModelJudge(tiny_model_dir, DataConfig(max_prompt_length=16), batch_size=3)
    items = _items()
    outcomes = judge.score(items)
    assert all(error is None for _, error in outcomes)  # the judge's prompt is not held to max_prompt_length
    batched = [score for score, _ in outcomes]
    single = [judge.score([item])[0][0] for item in items]
    assert all(0.0 < score < 1.0 for score in batched)
    assert batched == pytest.approx(single, abs=1e-5)
    assert len(set(round(score, 6) for score in batched)) == 3


def test_reward_model_in_reward_function(tiny_model_dir):
    """Invariant: reward_model_weight scales the judge's score into the total; items without the prompt's
    messages, or whose prompt holds a video, are refused with RewardError rather than judged blind; an item whose
    image cannot be read scores 0 with its error counted while the rest of the batch is judged."""
    reward = build_reward_function(RewardConfig(function="none", reward_model=tiny_model_dir, reward_model_weight=2.0),
                                   DataConfig(max_prompt_length=4096))
    results = reward.score_batch(_items()[:2])
    for result in results:
        assert result.score == pytest.approx(2.0 * result.components["reward_model"]) and result.accuracy == 0.0
    with pytest.raises(RewardError, match="messages"):
        reward.score_batch([("s", "\\boxed{1}", "1", {})])
    video = _items()[0]
    video = video._replace(messages=[{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "?"}]}])
    with pytest.raises(RewardError, match="not videos"):
        reward.score_batch([video])
    unreadable = _items()[0]._replace(images=[b"broken"])
    result, good = reward.score_batch([unreadable, _items()[0]])
    assert result.score == 0.0 and result.error.startswith("reward model: undecodable_image")
    assert good.error is None and good.score == pytest.approx(results[0].score)
    assert reward.metrics()["reward/errors_reward_model"] == 1
    reward.close()


def _score_through_experience(model_dir):
    """On one CPU rank: samples scored by generate_and_score with a reward-model reward, and the same responses
    judged from the rows' own chats and images."""
    import torch

    from mmrl_megatron.data.processor import PromptProcessor
    from mmrl_megatron.parallel import ParallelDims, start_processes
    from mmrl_megatron.rollout import SamplingParams
    from mmrl_megatron.trainer.experience import ExperienceSources, generate_and_score
    from tests.trainer.stand_ins import StandInEngine, positions

    dims = start_processes(ParallelDims(world_size=1), torch.device("cpu"))
    data_config = DataConfig(max_prompt_length=4096)
    processor = PromptProcessor(model_dir, data_config)
    rows = [make_row("How many squares?", [png(56, 56)], "1", "s"), make_row("Describe.", [png(112, 56)], "2", "s"),
            make_row("Text only question?", [], "3", "s")]
    prompts = [processor.process(parse_row(row), index) for index, row in enumerate(rows)]
    reward = build_reward_function(RewardConfig(function="none", reward_model=model_dir), data_config)
    sources = ExperienceSources(prompts=iter([]), engine=StandInEngine(), reward=reward,
                                decode=processor.tokenizer.decode, positions=positions, dims=dims)
    samples = generate_and_score(prompts, sources, SamplingParams(n=2, max_new_tokens=4, seed=3), 0, 0.0)
    own_rows = [rows[sample.group] for sample in samples]
    judged = reward.score_batch([
        RewardItem("s", processor.tokenizer.decode(sample.response_ids), row["reward_model"]["ground_truth"], {},
                   parse_row(row).messages, [image["bytes"] for image in row["images"]])
        for sample, row in zip(samples, own_rows)])
    return [sample.score for sample in samples], [result.score for result in judged], reward.metrics()


def test_reward_model_scores_through_the_experience_path(tiny_model_dir):
    """Invariant: with reward.reward_model set, the experience step hands the judge each prompt's chat and images
    (it used to pass only verl's four fields, and the first GRPO step stopped with RewardError): every sample is
    judged without error, and its score equals the judge's on the row's own messages and images."""
    from tests.cpu_ranks import run_on_cpu_ranks

    (scores, judged, metrics), = run_on_cpu_ranks(1, _score_through_experience, tiny_model_dir)
    assert len(scores) == 6 and all(0.0 < score < 1.0 for score in scores)
    assert scores == pytest.approx(judged, abs=1e-5)
    assert metrics["reward/errors_reward_model"] == 0

"""Multi-turn experience end to end on a CPU rank: the embedded engine's two- and three-turn rollouts (the
environment returning images) are turned into Samples by the trainer's own path (generate_and_score), and the
megatron actor, scoring them in packed micro-batches, gives every generated token the engine's log-prob."""
import torch

from mmrl_megatron.models.qwen2_5_vl.tiny import build_tiny_checkpoint
from tests.cpu_ranks import run_on_cpu_ranks
from tests.rollout.multi_turn_helpers import image_replies

TOLERANCE = 1e-4  # max abs, fp32: the acceptance bar


class RecordingReward:
    """Scores by text length and keeps every text it was asked to score."""

    def __init__(self):
        self.texts = []

    def score_batch(self, items):
        from types import SimpleNamespace

        self.texts += [item.response_text for item in items]
        return [SimpleNamespace(score=float(len(item.response_text) % 3), accuracy=0.0) for item in items]


def _rollout_and_score(hf_dir: str):
    """(per sample: rollout log-probs, actor log-probs, loss mask, images, response ids; the reward's texts)."""
    from mmrl_megatron.config import load_config
    from mmrl_megatron.config.validate import model_shape
    from mmrl_megatron.models.hf_config import read_hf_config
    from mmrl_megatron.models.common.packing import pack_sequences
    from mmrl_megatron.parallel import ParallelDims, start_processes
    from mmrl_megatron.rollout import build_engine
    from mmrl_megatron.rollout.multi_turn import build_multi_turn
    from mmrl_megatron.trainer import losses
    from mmrl_megatron.trainer.batch import build_micro_batches
    from mmrl_megatron.trainer.build import build_role, load_model
    from mmrl_megatron.trainer.experience import ExperienceSources, generate_and_score
    from mmrl_megatron.models.family import position_rule
    from tests.rollout.multi_turn_helpers import processor_for, scripted_prompts, stopping_sampling

    config = load_config(None, [f"model.hf_path={hf_dir}", "model.dtype=float32", "data.max_prompt_length=512",
                                "rollout.multi_turn.environment=scripted", "rollout.multi_turn.max_turns=3",
                                "rollout.multi_turn.max_total_tokens=600"])
    hf_config, device = read_hf_config(hf_dir), torch.device("cpu")
    dims = start_processes(ParallelDims.from_config(config, 1, model_shape(hf_config)), device)
    actor = build_role("actor", load_model(config, hf_config, "actor", device, dims), config, device, dims)
    engine = build_engine(config, hf_dir, device)
    engine.load_checkpoint()
    processor = processor_for(hf_dir)

    def decode(ids):
        return processor.tokenizer.decode(ids, skip_special_tokens=True)

    reward = RecordingReward()
    multi_turn = build_multi_turn(config, engine, processor, decode)
    sources = ExperienceSources(prompts=iter(()), engine=engine, reward=reward, decode=decode,
                                positions=position_rule(hf_config), dims=dims, multi_turn=multi_turn)
    samples = generate_and_score(scripted_prompts(processor, image_replies()), sources, stopping_sampling(), 0, 0.0)
    actor.score(build_micro_batches(samples, 700, pack_sequences),
                lambda output, micro_batch: losses.response_logprobs(output, micro_batch, 1.0, dims.tensor_group),
                "old_logprobs")
    return [(s.rollout_logprobs, s.tensors["old_logprobs"].tolist(), s.loss_mask, s.image_grid_thw.shape[0],
             s.response_ids) for s in samples], reward.texts, [decode(s.response_ids) for s in samples]


def test_multi_turn_rollout_logprobs_equal_the_actors(tmp_path):
    """Invariant (issue 20): for rollouts of up to three assistant turns whose tool turns return images, the
    megatron actor's log-prob of every generated token equals the embedded engine's within 1e-4 (fp32), with
    every image of the conversation placed (prompt's and tool's); the tool tokens carry loss mask 0 and no engine
    log-prob; and the reward function is given the whole trajectory's text, tool turns included."""
    hf_dir = build_tiny_checkpoint(str(tmp_path / "model"))
    [(samples, reward_texts, decoded)] = run_on_cpu_ranks(1, _rollout_and_score, hf_dir)
    assert max(images for *_, images, _ in samples) == 3  # a prompt image and both tool images in one sequence
    for rollout, actor, mask, images, response in samples:
        generated = torch.tensor(mask, dtype=torch.bool)
        environment_turns = sum(1 for i, value in enumerate(mask) if not value and mask[i - 1])
        assert len(mask) == len(response) and images == 1 + environment_turns  # each scripted reply has one image
        difference = (torch.tensor(rollout) - torch.tensor(actor))[generated].abs()
        assert difference.max() < TOLERANCE, difference.max()
        assert not torch.tensor(rollout)[~generated].any()
    assert reward_texts == decoded and sum("Zoomed in:" in text for text in reward_texts) >= 3

"""The environment's tokens in a multi-turn response carry no loss: no gradient reaches the logits that predict
them (policy loss, KL and entropy terms, every aggregation), their advantages are 0 for every estimator, they
do not count in the loss normalisation, and images may sit on them (they are given, not generated)."""
from types import SimpleNamespace

import pytest
import torch

from mmrl_megatron import algorithms
from mmrl_megatron.config.schema import AlgorithmConfig
from mmrl_megatron.trainer import losses
from mmrl_megatron.trainer.batch import Sample, build_micro_batch
from mmrl_megatron.trainer.loop import Trainer
from tests.trainer.stand_ins import pack_sequences, positions

VOCAB = 11
LOSS_MASKS = [[1, 1, 0, 0, 0, 1, 1], [1, 0, 0, 1, 1]]  # assistant, environment, assistant turns


def _samples():
    generator = torch.Generator().manual_seed(0)
    samples = []
    for group, mask in enumerate(LOSS_MASKS):
        response = torch.randint(0, VOCAB, (len(mask),), generator=generator).tolist()
        sample = Sample([1, 2, 3], response, group=group, loss_mask=mask, rollout_logprobs=[-2.0] * len(mask))
        sample.position_ids = positions(sample.prompt_ids, len(response), None)
        for name in ("old_logprobs", "ref_logprobs", "advantages", "rollout_logprobs"):
            # values on environment tokens too: the mask alone must keep them out
            sample.tensors[name] = -torch.rand(len(mask), generator=generator) - 0.5
        samples.append(sample)
    return samples


def _plain_vocab_functions():
    def logprobs(logits, labels, group=None):
        return torch.log_softmax(logits.float(), -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)

    def logprobs_and_entropy(logits, labels, group=None):
        logp = torch.log_softmax(logits.float(), -1)
        return logprobs(logits, labels), -(logp.exp() * logp).sum(-1)

    return logprobs, logprobs_and_entropy


@pytest.mark.parametrize("loss_agg", ["token_mean", "seq_mean_token_sum", "seq_mean_token_mean"])
def test_no_gradient_reaches_environment_tokens(monkeypatch, loss_agg):
    """Invariant: d loss / d logits is exactly 0 at every position that predicts an environment token (and at
    the prompt's), non-zero at each generated token's, with policy, KL, entropy and TIS terms all active."""
    monkeypatch.setattr(losses, "_vocab_parallel", _plain_vocab_functions)
    samples = _samples()
    micro_batch = build_micro_batch(samples, pack_sequences)
    logits = torch.randn(1, micro_batch.num_tokens, VOCAB, requires_grad=True)
    config = AlgorithmConfig(kl_coef=0.1, entropy_coef=0.01, loss_agg=loss_agg, tis_cap=2.0)
    generated = sum(s.trained_tokens for s in samples)
    loss, stats = losses.actor_loss(logits, micro_batch, config, 1.0, losses.Normaliser(generated, len(samples)),
                                    None)
    loss.backward()
    touched = logits.grad.abs().sum(-1)[0] > 0
    expected = torch.zeros(micro_batch.num_tokens, dtype=torch.bool)
    for row, sample in enumerate(samples):
        is_generated = torch.tensor(sample.loss_mask) == 1
        expected[micro_batch.response_index[row, :len(sample.loss_mask)][is_generated]] = True
    assert torch.equal(touched, expected)
    assert float(stats["kl/mean"][1]) == float(stats["loss/policy"][1]) == generated == 7


def test_environment_tokens_are_given_tokens_and_have_no_advantage():
    """Invariant: the micro-batch's response mask is the loss mask and its given-token mask (where image pads may
    take images) covers prompt and environment turns; GRPO, REINFORCE++ and GAE advantages (and GAE returns)
    are 0 on environment tokens, and the outcome reward lands on the last generated token."""
    samples = _samples()
    micro_batch = build_micro_batch(samples, pack_sequences)
    for row, sample in enumerate(samples):
        assert micro_batch.mask[row, :len(sample.loss_mask)].tolist() == sample.loss_mask
    starts = [0, samples[0].length]
    given = torch.zeros(micro_batch.num_tokens, dtype=torch.bool)
    for sample, start in zip(samples, starts):
        given[start:start + 3] = True
        given[start + 3:start + sample.length] = torch.tensor(sample.loss_mask) == 0
    assert torch.equal(micro_batch.prompt_mask[0], given)

    for advantage in ("grpo", "reinforce_plus_plus", "gae"):
        for sample in samples:
            sample.tensors["old_values"] = torch.rand(len(sample.response_ids)) + 0.1
            sample.score = float(sample.group)
        algorithm = AlgorithmConfig(advantage=advantage)
        stand_in = SimpleNamespace(algorithm=algorithm, estimator=algorithms.advantage_estimator(advantage),
                                   parts=SimpleNamespace(reference=None),
                                   config=SimpleNamespace(rollout=SimpleNamespace(n=2)))
        Trainer.compute_advantages(stand_in, samples)
        for sample in samples:
            environment = torch.tensor(sample.loss_mask) == 0
            assert not sample.tensors["advantages"][environment].any(), advantage
            assert sample.tensors["advantages"][~environment].abs().sum() > 0, advantage
            if advantage == "gae":
                assert not sample.tensors["returns"][environment].any()

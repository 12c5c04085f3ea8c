"""Sampling math: temperature, top-k, top-p, log-probs and the counter-based random streams."""
import math

import pytest
import torch

from mmrl_megatron.rollout.sampling import (counter_uniforms, draw_from_logits, filter_top_k, filter_top_p, hash32,
                                            sample_tokens, sequence_seeds, token_logprobs)


def _uniforms(count: int, seed: int = 0) -> torch.Tensor:
    return counter_uniforms(sequence_seeds(seed, torch.arange(count), torch.zeros(count, dtype=torch.long)),
                            torch.zeros(count, dtype=torch.long))


def test_temperature_zero_is_greedy():
    """Temperature 0 returns the argmax token of every row, whatever the random numbers."""
    logits = torch.randn(16, 50, generator=torch.Generator().manual_seed(0))
    tokens = sample_tokens(logits, temperature=0.0, top_p=0.5, top_k=5, uniforms=_uniforms(16))
    assert torch.equal(tokens, logits.argmax(-1))


def test_top_k_one_equals_greedy():
    """top_k=1 leaves only the most probable token, so sampling at any temperature is greedy."""
    logits = torch.randn(64, 50, generator=torch.Generator().manual_seed(1))
    tokens = sample_tokens(logits, temperature=1.3, top_p=1.0, top_k=1, uniforms=_uniforms(64))
    assert torch.equal(tokens, logits.argmax(-1))


def test_top_k_keeps_the_k_largest():
    """filter_top_k keeps exactly the k largest logits of each row and sets the rest to -inf."""
    logits = torch.tensor([[0.1, 3.0, -1.0, 2.0, 0.5]])
    kept = torch.isfinite(filter_top_k(logits, 2))
    assert kept.tolist() == [[False, True, False, True, False]]
    assert torch.equal(filter_top_k(logits, -1), logits)


def test_top_p_keeps_the_smallest_set_reaching_p():
    """top_p keeps the most probable tokens up to and including the one whose cumulative mass reaches p."""
    logits = torch.tensor([[0.05, 0.5, 0.15, 0.3]]).log()
    kept = lambda p: torch.isfinite(filter_top_p(logits, p))[0].tolist()  # noqa: E731
    assert kept(0.75) == [False, True, False, True]  # 0.5 < 0.75 <= 0.8
    assert kept(0.8) == [False, True, False, True]  # 0.8 already reaches 0.8
    assert kept(0.81) == [False, True, True, True]
    assert kept(0.1) == [False, True, False, False]  # the most probable token always stays
    assert kept(1.0) == [True, True, True, True]


def test_draws_follow_the_filtered_distribution():
    """Seeded inverse-CDF draws reproduce the renormalised filtered distribution and never pick a filtered token."""
    count = 200_000
    logits = torch.tensor([0.05, 0.5, 0.15, 0.3, 1e-9]).log().expand(count, -1)
    tokens = sample_tokens(logits, temperature=1.0, top_p=0.81, top_k=-1, uniforms=_uniforms(count))
    frequencies = torch.bincount(tokens, minlength=5).double() / count
    expected = torch.tensor([0.0, 0.5, 0.15, 0.3, 0.0], dtype=torch.float64) / 0.95
    assert (frequencies - expected).abs().max() < 0.005
    assert frequencies[0] == 0 and frequencies[4] == 0


def test_draw_never_returns_zero_probability_tokens_at_the_edges():
    """Uniforms at 0 and just below 1 still land on tokens of positive probability."""
    logits = torch.tensor([[float("-inf"), 0.0, float("-inf"), 0.0, float("-inf")]] * 2)
    tokens = draw_from_logits(logits, torch.tensor([0.0, 1.0 - 2.0 ** -24], dtype=torch.float64))
    assert tokens.tolist() == [1, 3]


def test_logprobs_are_under_the_temperature_scaled_unfiltered_distribution():
    """token_logprobs equals log_softmax(logits / T) at the token (greedy: T=1), as the trainer recomputes it."""
    logits = torch.randn(8, 30, generator=torch.Generator().manual_seed(2))
    tokens = torch.randint(0, 30, (8,), generator=torch.Generator().manual_seed(3))
    for temperature, divisor in [(0.7, 0.7), (1.0, 1.0), (0.0, 1.0)]:
        expected = torch.log_softmax(logits / divisor, -1)[torch.arange(8), tokens]
        torch.testing.assert_close(token_logprobs(logits, tokens, temperature), expected, rtol=0, atol=1e-6)


def test_streams_are_reproducible_uniform_and_independent():
    """Same (seed, request, sample, step) -> same number; streams of different samples are uncorrelated."""
    steps = torch.arange(20_000)
    seeds = sequence_seeds(7, torch.tensor([3, 3, 4]), torch.tensor([0, 1, 0]))
    assert len(set(seeds.tolist())) == 3
    streams = [counter_uniforms(seed.expand_as(steps), steps) for seed in seeds]
    assert torch.equal(streams[0], counter_uniforms(seeds[0].expand_as(steps), steps))
    for stream in streams:
        assert abs(stream.mean().item() - 0.5) < 0.01
        assert abs(stream.var().item() - 1 / 12) < 0.005
        assert stream.min() >= 0 and stream.max() < 1
    for first, second in [(0, 1), (0, 2), (1, 2)]:
        correlation = torch.corrcoef(torch.stack([streams[first], streams[second]]))[0, 1].item()
        assert abs(correlation) < 4 / math.sqrt(len(steps))
    assert not torch.equal(sequence_seeds(8, torch.tensor([3]), torch.tensor([0])), seeds[:1])


def test_hash_is_a_bijection_on_32_bits():
    """hash32 never maps two inputs to one output (checked on a block of inputs), so streams never collide."""
    values = torch.arange(1 << 16) * 65_537 + 12_345
    hashed = hash32(values)
    assert hashed.unique().numel() == values.numel()
    assert hashed.min() >= 0 and hashed.max() < (1 << 32)


@pytest.mark.gpu
def test_compiled_uniforms_on_gpu_are_the_cpu_bits():
    """Invariant: the compiled GPU stream is the CPU's, number for number (integer hashing, exact), so a seeded
    rollout draws the same uniforms on either device."""
    seeds = sequence_seeds(7, torch.arange(256) // 5, torch.arange(256) % 5)
    counters = torch.arange(256) * 37
    expected = counter_uniforms(seeds, counters)
    assert torch.equal(counter_uniforms(seeds.cuda(), counters.cuda()).cpu(), expected)

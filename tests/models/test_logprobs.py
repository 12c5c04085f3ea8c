"""Chunked log-probs and entropy equal torch's full-vocabulary computation, values and gradients, with
vocabulary-padding columns at -inf ignored. (The tensor-parallel case runs in test_qwen2_5_vl_parity.)"""
import pytest
import torch

from mmrl_megatron.models.common.logprobs import vocab_parallel_entropy, vocab_parallel_logprobs

VOCAB, PADDING = 11, 3


def _logits(seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 7, VOCAB + PADDING, generator=generator, dtype=torch.float64) * 3
    logits[..., VOCAB:] = float("-inf")
    return logits


def _reference_entropy(logits):
    real = logits[..., :VOCAB]
    return -(torch.softmax(real, -1) * torch.log_softmax(real, -1)).sum(-1)


@pytest.mark.parametrize("chunk_tokens", [1, 4, 1024])
def test_logprobs_and_gradients_match_log_softmax(chunk_tokens):
    """Invariant: log p(label) and d/dlogits equal log_softmax's, whatever the chunk size."""
    logits = _logits().requires_grad_()
    labels = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))
    weights = torch.randn(2, 7, dtype=torch.float64)
    mine = vocab_parallel_logprobs(logits, labels, chunk_tokens=chunk_tokens)
    (mine.double() * weights).sum().backward()
    mine_grad = logits.grad.clone()
    logits.grad = None
    expected = torch.log_softmax(logits[..., :VOCAB], -1).gather(-1, labels[..., None]).squeeze(-1)
    (expected * weights).sum().backward()
    assert mine.dtype == torch.float32
    assert torch.allclose(mine.double(), expected, atol=1e-5)
    assert torch.allclose(mine_grad[..., :VOCAB], logits.grad[..., :VOCAB], atol=1e-5)
    assert (mine_grad[..., VOCAB:] == 0).all()


@pytest.mark.parametrize("chunk_tokens", [3, 1024])
def test_entropy_and_gradients_match_softmax(chunk_tokens):
    """Invariant: entropy and its gradient equal the full softmax's; padding columns add nothing (no NaN)."""
    logits = _logits(2).requires_grad_()
    weights = torch.randn(2, 7, dtype=torch.float64)
    mine = vocab_parallel_entropy(logits, chunk_tokens=chunk_tokens)
    (mine.double() * weights).sum().backward()
    mine_grad = logits.grad.clone()
    logits.grad = None
    expected = _reference_entropy(logits)
    (expected * weights).sum().backward()
    assert torch.allclose(mine.double(), expected, atol=1e-5)
    assert torch.allclose(mine_grad[..., :VOCAB], logits.grad[..., :VOCAB], atol=1e-5)
    assert torch.isfinite(mine_grad).all()


def test_bfloat16_logits_give_float32_results_and_bfloat16_gradients():
    """Invariant: low-precision logits are upcast per chunk; the gradient keeps the logits' dtype."""
    logits = _logits(3).to(torch.bfloat16).requires_grad_()
    labels = torch.zeros(2, 7, dtype=torch.long)
    result = vocab_parallel_logprobs(logits, labels, chunk_tokens=5)
    result.sum().backward()
    assert result.dtype == torch.float32 and logits.grad.dtype == torch.bfloat16
    expected = torch.log_softmax(logits.detach().float()[..., :VOCAB], -1)[..., 0]
    assert torch.allclose(result, expected, atol=1e-5)


def _large_logits(seed: int) -> torch.Tensor:
    """float64 logits near +-150 (peaked rows and flat rows), the range where log Z and E[x] are each ~150."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(4, 8, 512, generator=generator, dtype=torch.float64) * 3 + 150
    logits[1] -= 300  # around -150
    logits[2] = torch.randn(8, 512, generator=generator, dtype=torch.float64) * 150  # spread over +-150 and beyond
    return logits


# verl 0.9.1's entropy_from_logits reaches 2.1e-5 at this scale; the unshifted formula lost 4e-4 to 1e-2
LARGE_LOGIT_TOLERANCE = 2.1e-5


def test_entropy_at_large_logits_matches_float64():
    """Invariant: at |logit| ~ 150 the float32 entropy and its gradient stay within verl's 2.1e-5 of the float64
    softmax entropy (log Z and E[x] are taken on max-shifted logits, so nothing cancels at magnitude 150)."""
    exact_logits = _large_logits(4).requires_grad_()
    weights = torch.randn(4, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    expected = -(torch.softmax(exact_logits, -1) * torch.log_softmax(exact_logits, -1)).sum(-1)
    (expected * weights).sum().backward()
    logits = exact_logits.detach().float().requires_grad_()
    mine = vocab_parallel_entropy(logits, chunk_tokens=5)
    (mine * weights.float()).sum().backward()
    assert (mine.double() - expected.detach()).abs().max() < LARGE_LOGIT_TOLERANCE
    assert (logits.grad.double() - exact_logits.grad).abs().max() < LARGE_LOGIT_TOLERANCE


def _sharded_entropy(logits: torch.Tensor):
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    width = logits.shape[-1] // world
    shard = logits[..., rank * width:(rank + 1) * width].float().requires_grad_()
    entropy = vocab_parallel_entropy(shard, chunk_tokens=3, group=dist.group.WORLD)
    entropy.sum().backward()
    return entropy.detach(), shard.grad


def test_entropy_at_large_logits_over_tensor_parallel_shards():
    """Invariant: with the vocabulary split over 2 ranks (each shard with its own local max), the entropy and
    each shard's gradient still equal the float64 full-vocabulary values within 2.1e-5."""
    from tests.cpu_ranks import run_on_cpu_ranks

    exact_logits = _large_logits(6)
    exact_logits[0, :, :256] -= 40  # the row max lies in the second shard only
    exact_logits.requires_grad_()
    expected = -(torch.softmax(exact_logits, -1) * torch.log_softmax(exact_logits, -1)).sum(-1)
    expected.sum().backward()
    results = run_on_cpu_ranks(2, _sharded_entropy, exact_logits.detach())
    for rank, (entropy, grad) in enumerate(results):
        assert (entropy.double() - expected.detach()).abs().max() < LARGE_LOGIT_TOLERANCE
        shard_grad = exact_logits.grad[..., rank * 256:(rank + 1) * 256]
        assert (grad.double() - shard_grad).abs().max() < LARGE_LOGIT_TOLERANCE

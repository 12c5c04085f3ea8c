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

"""The Triton draw (draw_kernel.py) against sampling.py's float64 inverse-CDF draw and log_softmax.

The kernel runs in Triton's interpreter on CPU tensors (TRITON_INTERPRET=1 must be set before the kernel's
module is imported, hence a spawned process); the same kernel runs compiled on a GPU (the gpu test).
Rows are wider than one block of the kernels' column loop and span two of their chunks (8,192 columns), with
vocabulary-padding columns at -inf."""
import pytest
import torch

from mmrl_megatron.rollout.sampling import counter_uniforms, sample_tokens, token_logprobs
from tests.cpu_ranks import run_on_cpu_ranks

ROWS, VOCAB, PADDING = 48, 9000, 216  # 9,216 columns: three blocks of the 4,096-column loop, two chunks


def _logits(seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(ROWS, VOCAB + PADDING, generator=generator) * 3
    logits[:, VOCAB:] = float("-inf")
    logits[0, :] = float("-inf")
    logits[0, 5000] = 2.0  # all of row 0's mass on one token in the second block
    logits[3, :] = float("-inf")
    logits[3, [100, 8500]] = torch.tensor([0.0, 9.0])  # row 3's mass almost all in the second chunk
    return logits


def _uniforms(rows: int) -> torch.Tensor:
    uniforms = counter_uniforms(torch.arange(rows) * 7919 + 11, torch.arange(rows))
    uniforms[1] = 1.0 - 2.0 ** -24  # the largest uniform: the last token of non-zero probability or its neighbour
    uniforms[2] = 0.0  # the smallest: the first token of non-zero probability
    return uniforms


def _kernel(logits, temperature, uniforms):
    from mmrl_megatron.rollout.draw_kernel import draw_with_logprobs

    return draw_with_logprobs(logits, temperature, uniforms)


@pytest.fixture
def interpreted(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_kernel_draws_the_eager_paths_tokens_with_their_logprobs(interpreted, temperature):
    """Invariant: with the same uniforms the kernel picks the tokens sampling.py's inverse-CDF draw picks (these
    rows hold no uniform within fp32 rounding of a CDF step), never a padding column, and returns
    log softmax(logits / T) of them within 1e-5."""
    logits, uniforms = _logits(0), _uniforms(ROWS)
    expected_tokens = sample_tokens(logits, temperature, 1.0, 0, uniforms)
    expected_logprobs = token_logprobs(logits, expected_tokens, temperature)
    [(tokens, logprobs)] = run_on_cpu_ranks(1, _kernel, logits, temperature, uniforms)
    assert tokens.dtype == torch.long and logprobs.dtype == torch.float32
    assert torch.equal(tokens, expected_tokens)
    assert tokens[0] == 5000 and tokens[3] == 8500 and (tokens < VOCAB).all()
    assert (logprobs - expected_logprobs).abs().max() < 1e-5


def test_bfloat16_logits_are_read_as_they_are(interpreted):
    """Invariant: bf16 logits give the draw and log-probs of the same values in fp32."""
    logits = _logits(1).to(torch.bfloat16)
    uniforms = _uniforms(ROWS)
    expected_tokens = sample_tokens(logits, 1.0, 1.0, 0, uniforms)
    [(tokens, logprobs)] = run_on_cpu_ranks(1, _kernel, logits, 1.0, uniforms)
    assert torch.equal(tokens, expected_tokens)
    assert (logprobs - token_logprobs(logits, expected_tokens, 1.0)).abs().max() < 1e-5


@pytest.mark.gpu
def test_compiled_kernel_matches_the_eager_draw_on_gpu():
    """Invariant: compiled on a GPU at the 3B vocabulary (256 rows x 151,936 bf16 columns), the kernel's tokens
    are the eager draw's on at least 255 of 256 rows (a uniform within fp32 rounding of a CDF step may pick a
    neighbour) and the log-probs of the common tokens agree within 1e-4."""
    from mmrl_megatron.rollout.draw_kernel import draw_with_logprobs

    generator = torch.Generator(device="cuda").manual_seed(0)
    logits = (torch.randn(256, 151936, device="cuda", generator=generator) * 3).bfloat16()
    uniforms = counter_uniforms(torch.arange(256, device="cuda") * 7919 + 11, torch.arange(256, device="cuda"))
    tokens, logprobs = draw_with_logprobs(logits, 1.0, uniforms)
    expected = sample_tokens(logits, 1.0, 1.0, 0, uniforms)
    same = tokens == expected
    assert int(same.sum()) >= 255
    assert (logprobs[same] - token_logprobs(logits, expected, 1.0)[same]).abs().max() < 1e-4

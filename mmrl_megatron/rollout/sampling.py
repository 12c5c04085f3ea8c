"""Token sampling as pure functions of logits: temperature, top-k, top-p, log-probs, seeded draws.

Randomness is counter-based: the uniform number behind token i of a sequence is a hash of
(sequence seed, i), and the sequence seed is a hash of (call seed, request index, sample index). A
sequence's samples therefore do not depend on which other sequences share its batch, the n samples
of a request are independent streams, and a fixed seed reproduces a rollout. Hand-written because
torch generators are per-device objects, not per-row streams.
"""
from typing import Optional, Tuple

import torch

from ..models.common.decode_layer import fused

_MASK32 = 0xFFFFFFFF


def _multiply_mod32(values: torch.Tensor, constant: int) -> torch.Tensor:
    """(values * constant) mod 2**32 for int64 tensors in [0, 2**32), without int64 overflow."""
    low = (values & 0xFFFF) * constant
    high = (((values >> 16) * constant) & 0xFFFF) << 16
    return (low + high) & _MASK32


def hash32(values: torch.Tensor) -> torch.Tensor:
    """A bijective 32-bit integer mix (Wellons' lowbias32) applied elementwise to int64 tensors."""
    values = values & _MASK32
    values = values ^ (values >> 16)
    values = _multiply_mod32(values, 0x7FEB352D)
    values = values ^ (values >> 15)
    values = _multiply_mod32(values, 0x846CA68B)
    return values ^ (values >> 16)


def sequence_seeds(seed: int, request_indices: torch.Tensor, sample_indices: torch.Tensor) -> torch.Tensor:
    """One int64 stream seed per sequence, a function of (seed, request index, sample index) only."""
    mixed = hash32(torch.full_like(request_indices, seed & _MASK32))
    mixed = hash32(mixed ^ hash32(request_indices + 0x632BE5AB))
    return hash32(mixed ^ hash32(sample_indices + 0x9E3779B9))


def _counter_uniforms(seeds: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    bits = hash32(seeds ^ hash32(counters + 0x85EBCA6B))
    return (bits >> 8).to(torch.float64) / float(1 << 24)


def counter_uniforms(seeds: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """Uniform floats in [0, 1) (24-bit resolution, float64), one per (seed, counter) pair. One compiled kernel
    on a GPU (integer arithmetic, so the same bits): eager, the two hashes are some fifty elementwise kernels,
    launched in every decode step."""
    return fused(_counter_uniforms, seeds)(seeds, counters)


def scale_by_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """fp32 logits / temperature; temperature 0 (greedy) and 1 leave them unscaled (no pass over the vocabulary)."""
    logits = logits.float()
    return logits / temperature if temperature > 0 and temperature != 1.0 else logits


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    """log softmax(logits / T)[token] per row: what the trainer recomputes. Greedy uses T = 1.

    Top-k/top-p filtering is deliberately not applied: the trainer scores the full distribution.
    """
    logprobs = torch.log_softmax(scale_by_temperature(logits, temperature), dim=-1)
    return logprobs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def filter_top_k(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Keep the top_k largest logits per row (ties with the k-th are kept); others become -inf. k <= 0: off."""
    if top_k <= 0 or top_k >= logits.shape[-1]:
        return logits
    kth_largest = torch.topk(logits, top_k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth_largest, float("-inf"))


def filter_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most probable tokens whose probability reaches top_p; others become -inf."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    sorted_probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    drop_sorted = mass_before >= top_p
    drop_sorted[..., 0] = False  # the most probable token always stays
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def draw_from_logits(logits: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw per row: the first token whose cumulative probability exceeds the uniform.

    The CDF is accumulated in float64 so that u * total stays strictly below the total and a token
    of probability zero (a filtered one) can never be chosen.
    """
    cdf = torch.cumsum(torch.softmax(logits.float(), dim=-1), dim=-1, dtype=torch.float64)
    targets = (uniforms.double() * cdf[..., -1]).unsqueeze(-1)
    return torch.searchsorted(cdf, targets, right=True).squeeze(-1).clamp_(max=logits.shape[-1] - 1)


def sample_tokens(logits: torch.Tensor, temperature: float, top_p: float, top_k: int,
                  uniforms: Optional[torch.Tensor]) -> torch.Tensor:
    """Next token per row of logits [rows, vocab]: argmax at temperature 0, else a filtered draw."""
    if temperature <= 0:
        return torch.argmax(logits, dim=-1)
    scaled = filter_top_p(filter_top_k(scale_by_temperature(logits, temperature), top_k), top_p)
    return draw_from_logits(scaled, uniforms)


def sample_with_logprobs(logits: torch.Tensor, temperature: float, top_p: float, top_k: int,
                         uniforms: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """(sample_tokens' tokens, their token_logprobs) per row of logits [rows, vocab]. Plain temperature
    sampling on a GPU runs as one Triton kernel (draw_kernel.py); filtered, greedy and CPU draws as above."""
    unfiltered = top_p >= 1.0 and (top_k <= 0 or top_k >= logits.shape[-1])
    if logits.is_cuda and temperature > 0 and unfiltered:
        from .draw_kernel import draw_with_logprobs  # Triton: present wherever CUDA tensors are

        return draw_with_logprobs(logits, temperature, uniforms)
    tokens = sample_tokens(logits, temperature, top_p, top_k, uniforms)
    return tokens, token_logprobs(logits, tokens, temperature)

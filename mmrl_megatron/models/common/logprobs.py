"""Per-token log-probabilities and entropy over a tensor-parallel (vocabulary-sharded) logits tensor.

Tokens are processed in chunks, and backward recomputes each chunk's softmax from the saved logits
(they are the model's output anyway), so no fp32 tensor of full-vocabulary width exists for more than
`chunk_tokens` tokens at a time, forward or backward. Padding columns at -inf (models mask them)
contribute nothing. Written here rather than taken from megatron-core because its
vocab_parallel_cross_entropy keeps an fp32 softmax of the whole micro-batch for backward and has no
entropy. On a GPU both come from one set of Triton passes instead (fused_logprobs.py); the chunked eager
path here is the exact reference, and what the CPU runs.
"""
import functools
import importlib.util
from typing import Optional, Tuple

import torch
import torch.distributed as dist

from ...config.schema import DEFAULT_CHUNK_TOKENS


def _sharded_over(group):
    """The group the vocabulary is split over, None when it is not split (no group, or a group of one)."""
    return group if group is not None and dist.get_world_size(group) > 1 else None


def _all_reduce(tensor: torch.Tensor, op, group) -> torch.Tensor:
    if group is not None:
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


def _log_normaliser(chunk: torch.Tensor, group) -> torch.Tensor:
    """log sum_v exp(x_v) over the whole vocabulary for each row of an fp32 shard chunk [n, V/TP]."""
    peak = _all_reduce(chunk.max(dim=-1).values, dist.ReduceOp.MAX, group)
    total = _all_reduce(torch.exp(chunk - peak[:, None]).sum(dim=-1), dist.ReduceOp.SUM, group)
    return peak + torch.log(total)


def _expectation(probs: torch.Tensor, chunk: torch.Tensor) -> torch.Tensor:
    """sum_v p_v x_v over this shard, with 0 * (-inf) taken as 0."""
    return torch.where(probs > 0, probs * chunk, torch.zeros_like(chunk)).sum(dim=-1)


def _vocab_offset(shard_width: int, group) -> int:
    return (dist.get_rank(group) if group is not None else 0) * shard_width


class _VocabParallelLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, chunk_tokens, group):
        flat, flat_labels = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
        first = _vocab_offset(flat.shape[-1], group)
        local = flat_labels - first
        owned = (local >= 0) & (local < flat.shape[-1])
        local = local.clamp(0, flat.shape[-1] - 1)
        log_normaliser = torch.empty(flat.shape[0], dtype=torch.float32, device=flat.device)
        target = torch.empty_like(log_normaliser)
        for start in range(0, flat.shape[0], chunk_tokens):
            rows = slice(start, start + chunk_tokens)
            chunk = flat[rows].float()
            log_normaliser[rows] = _log_normaliser(chunk, group)
            picked = chunk.gather(-1, local[rows, None]).squeeze(-1)
            target[rows] = torch.where(owned[rows], picked, torch.zeros_like(picked))
        _all_reduce(target, dist.ReduceOp.SUM, group)
        ctx.save_for_backward(logits, local, owned, log_normaliser)
        ctx.chunk_tokens = chunk_tokens
        return (target - log_normaliser).view(labels.shape)

    @staticmethod
    def backward(ctx, grad_output):
        logits, local, owned, log_normaliser = ctx.saved_tensors
        flat = logits.reshape(-1, logits.shape[-1])
        grad = grad_output.reshape(-1).float()
        grad_logits = torch.empty_like(flat)
        for start in range(0, flat.shape[0], ctx.chunk_tokens):
            rows = slice(start, start + ctx.chunk_tokens)
            chunk_grad = -torch.exp(flat[rows].float() - log_normaliser[rows, None]) * grad[rows, None]
            chunk_grad.scatter_add_(-1, local[rows, None], (grad[rows] * owned[rows])[:, None])
            grad_logits[rows] = chunk_grad.to(grad_logits.dtype)
        return grad_logits.view(logits.shape), None, None, None


def _peak_and_shifted_log_normaliser(chunk: torch.Tensor, group):
    """(m, log sum_v exp(x_v - m)) per row of an fp32 shard chunk [n, V/TP], m the row max over the vocabulary."""
    peak = _all_reduce(chunk.max(dim=-1).values, dist.ReduceOp.MAX, group)
    total = _all_reduce(torch.exp(chunk - peak[:, None]).sum(dim=-1), dist.ReduceOp.SUM, group)
    return peak, torch.log(total)


class _VocabParallelEntropy(torch.autograd.Function):
    # H = log Z - E_p[x] on logits shifted by the row max m (H is shift-invariant): at |x| ~ 150 the unshifted
    # terms are each ~150, and their float32 difference loses ~4e-4; shifted, the terms that matter are O(1).
    @staticmethod
    def forward(ctx, logits, chunk_tokens, group):
        flat = logits.reshape(-1, logits.shape[-1])
        peak = torch.empty(flat.shape[0], dtype=torch.float32, device=flat.device)
        shifted_log_normaliser = torch.empty_like(peak)
        shifted_mean = torch.empty_like(peak)
        for start in range(0, flat.shape[0], chunk_tokens):
            rows = slice(start, start + chunk_tokens)
            chunk = flat[rows].float()
            peak[rows], shifted_log_normaliser[rows] = _peak_and_shifted_log_normaliser(chunk, group)
            shifted = chunk - peak[rows, None]
            shifted_mean[rows] = _expectation(torch.exp(shifted - shifted_log_normaliser[rows, None]), shifted)
        _all_reduce(shifted_mean, dist.ReduceOp.SUM, group)
        ctx.save_for_backward(logits, peak, shifted_log_normaliser, shifted_mean)
        ctx.chunk_tokens = chunk_tokens
        return (shifted_log_normaliser - shifted_mean).view(logits.shape[:-1])

    @staticmethod
    def backward(ctx, grad_output):
        # dH/dx_v = -p_v (x_v - E_p[x]), both terms shifted by m
        logits, peak, shifted_log_normaliser, shifted_mean = ctx.saved_tensors
        flat = logits.reshape(-1, logits.shape[-1])
        grad = grad_output.reshape(-1).float()
        grad_logits = torch.empty_like(flat)
        for start in range(0, flat.shape[0], ctx.chunk_tokens):
            rows = slice(start, start + ctx.chunk_tokens)
            shifted = flat[rows].float() - peak[rows, None]
            probs = torch.exp(shifted - shifted_log_normaliser[rows, None])
            centred = torch.where(probs > 0, probs * (shifted - shifted_mean[rows, None]), torch.zeros_like(shifted))
            grad_logits[rows] = (-centred * grad[rows, None]).to(grad_logits.dtype)
        return grad_logits.view(logits.shape), None, None


@functools.lru_cache(maxsize=None)
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def _fused(logits: torch.Tensor) -> bool:
    """Whether the Triton kernels take these logits (CUDA tensors, where torch's CUDA builds bring Triton)."""
    return logits.is_cuda and _triton_installed()


def vocab_parallel_logprobs_and_entropy(logits_shard: torch.Tensor, labels: torch.Tensor,
                                        chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
                                        group: Optional[object] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(log p(labels) [...], entropy [...]), fp32 and differentiable, from logits [..., V/TP] sharded over
    `group` (ParallelDims.tensor_group; None: the logits hold the whole vocabulary)."""
    if _fused(logits_shard):
        from .fused_logprobs import fused_logprobs_and_entropy

        return fused_logprobs_and_entropy(logits_shard, labels, _sharded_over(group))
    return eager_logprobs_and_entropy(logits_shard, labels, chunk_tokens, group)


def eager_logprobs_and_entropy(logits_shard: torch.Tensor, labels: torch.Tensor,
                               chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
                               group: Optional[object] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """vocab_parallel_logprobs_and_entropy through the chunked eager path on any device (the reference)."""
    group = _sharded_over(group)
    return (_VocabParallelLogprobs.apply(logits_shard, labels.long(), chunk_tokens, group),
            _VocabParallelEntropy.apply(logits_shard, chunk_tokens, group))


def vocab_parallel_logprobs(logits_shard: torch.Tensor, labels: torch.Tensor,
                            chunk_tokens: int = DEFAULT_CHUNK_TOKENS, group: Optional[object] = None) -> torch.Tensor:
    """log p(labels) [...] (fp32) from logits [..., V/TP] sharded over `group` (as above)."""
    if _fused(logits_shard):  # the entropy comes in the same passes
        return vocab_parallel_logprobs_and_entropy(logits_shard, labels, chunk_tokens, group)[0]
    return _VocabParallelLogprobs.apply(logits_shard, labels.long(), chunk_tokens, _sharded_over(group))


def vocab_parallel_entropy(logits_shard: torch.Tensor, chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
                           group: Optional[object] = None) -> torch.Tensor:
    """Entropy of softmax(logits) per token [...] (fp32), logits [..., V/TP] sharded over `group` (as
    vocab_parallel_logprobs)."""
    return _VocabParallelEntropy.apply(logits_shard, chunk_tokens, _sharded_over(group))

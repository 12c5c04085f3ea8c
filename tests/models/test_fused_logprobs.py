"""The Triton log-prob + entropy kernels (fused_logprobs.py) against float64 log_softmax, values and gradients.

The kernels run in Triton's interpreter on CPU tensors (TRITON_INTERPRET=1 must be set before the kernels'
module is imported, hence spawned processes); the same kernels run compiled on a GPU (the gpu test).
Rows are wider than one block of the kernels' column loop, with vocabulary-padding columns at -inf."""
import pytest
import torch

from tests.cpu_ranks import run_on_cpu_ranks

ROWS, VOCAB, PADDING = 6, 4500, 92  # 4,592 columns: two blocks of the 4,096-column loop
TOLERANCE = 2.1e-5  # as the eager path's large-logit tests (test_logprobs.py): verl's own entropy reaches this


def _logits(seed: int, scale: float, offset: float = 0.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(ROWS, VOCAB + PADDING, generator=generator, dtype=torch.float64) * scale + offset
    logits[:, VOCAB:] = float("-inf")
    return logits


def _reference(logits: torch.Tensor, labels: torch.Tensor, weights):
    """float64 (log-probs, entropy) and d(sum w_lp lp + w_h H)/dlogits."""
    logits = logits.detach().clone().requires_grad_()
    logp = torch.log_softmax(logits[:, :VOCAB], -1)
    logprobs = logp.gather(-1, labels[:, None]).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    ((logprobs * weights[0]).sum() + (entropy * weights[1]).sum()).backward()
    return logprobs.detach(), entropy.detach(), logits.grad


def _fused_on_shard(logits, labels, weights, dtype, use):
    """This rank's shard through the fused kernels -> (log-probs, entropy, the shard's gradient)."""
    import torch.distributed as dist

    from mmrl_megatron.models.common.fused_logprobs import fused_logprobs_and_entropy

    world = dist.get_world_size()
    group = dist.group.WORLD if world > 1 else None
    width = logits.shape[-1] // world
    rank = dist.get_rank()
    shard = logits[:, rank * width:(rank + 1) * width].to(dtype).requires_grad_()
    logprobs, entropy = fused_logprobs_and_entropy(shard, labels, group)
    loss = sum((value * weight.float()).sum() for value, weight, used in
               zip((logprobs, entropy), weights, use) if used)
    loss.backward()
    return logprobs.detach(), entropy.detach(), shard.grad


@pytest.fixture
def interpreted(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.mark.parametrize("use", [(True, True), (True, False), (False, True)], ids=["both", "logprobs", "entropy"])
def test_fused_logprobs_and_entropy_match_float64(interpreted, use):
    """Invariant: log p(label), entropy and the gradient of any weighted sum of them equal float64
    log_softmax's within 2.1e-5, for logits near 0 and near +-150; padding columns get exactly 0."""
    labels = torch.randint(0, VOCAB, (ROWS,), generator=torch.Generator().manual_seed(1))
    weights = torch.randn(2, ROWS, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    weights = torch.stack([w if used else torch.zeros_like(w) for w, used in zip(weights, use)])
    for logits in (_logits(0, 3.0), _logits(3, 3.0, offset=150.0)):
        expected = _reference(logits, labels, weights)
        [mine] = run_on_cpu_ranks(1, _fused_on_shard, logits, labels, weights, torch.float32, use)
        for value, reference in zip(mine[:2], expected[:2]):
            assert value.dtype == torch.float32 and (value.double() - reference).abs().max() < TOLERANCE
        assert (mine[2][:, :VOCAB].double() - expected[2][:, :VOCAB]).abs().max() < TOLERANCE
        assert (mine[2][:, VOCAB:] == 0).all()


def test_fused_logprobs_over_tensor_parallel_shards(interpreted):
    """Invariant: with the vocabulary split over 2 ranks (labels owned by either, the row max in one shard
    only), both ranks get the full-vocabulary values and each shard its slice of the gradient."""
    logits = _logits(4, 3.0)
    logits[0, :2296] -= 40  # row 0's max lies in the second shard only
    labels = torch.tensor([5, 4400, 2295, 2296, 0, 4499])  # owned by rank 0, 1, 0, 1, 0, 1
    weights = torch.randn(2, ROWS, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    expected = _reference(logits, labels, weights)
    results = run_on_cpu_ranks(2, _fused_on_shard, logits, labels, weights, torch.float32, (True, True))
    for rank, (logprobs, entropy, grad) in enumerate(results):
        assert (logprobs.double() - expected[0]).abs().max() < TOLERANCE
        assert (entropy.double() - expected[1]).abs().max() < TOLERANCE
        shard = expected[2][:, rank * 2296:(rank + 1) * 2296]
        assert (grad.double() - shard).abs().max() < TOLERANCE


def test_bfloat16_logits_give_float32_results_and_bfloat16_gradients(interpreted):
    """Invariant: bf16 logits are read as they are and widened in the kernel; the gradient keeps bf16."""
    logits = _logits(6, 3.0).to(torch.bfloat16).double()  # the values bf16 can hold
    labels = torch.zeros(ROWS, dtype=torch.long)
    weights = torch.ones(2, ROWS, dtype=torch.float64)
    expected = _reference(logits, labels, weights)
    [(logprobs, entropy, grad)] = run_on_cpu_ranks(1, _fused_on_shard, logits, labels, weights, torch.bfloat16,
                                                   (True, True))
    assert logprobs.dtype == torch.float32 and grad.dtype == torch.bfloat16
    assert (logprobs.double() - expected[0]).abs().max() < TOLERANCE
    assert (entropy.double() - expected[1]).abs().max() < TOLERANCE
    assert (grad[:, :VOCAB].double() - expected[2][:, :VOCAB]).abs().max() < 1e-2  # bf16 rounding of the gradient


@pytest.mark.gpu
def test_compiled_kernels_match_the_eager_path_on_gpu():
    """Invariant: compiled on a GPU, the kernels give the chunked eager path's log-probs and entropy (within
    1e-4: fp32 sums in another order) and its bf16 gradient (within 1% of the largest entry), at the 3B
    output layer's 151,936 columns."""
    from mmrl_megatron.models.common.fused_logprobs import fused_logprobs_and_entropy
    from mmrl_megatron.models.common.logprobs import eager_logprobs_and_entropy

    generator = torch.Generator(device="cuda").manual_seed(0)
    logits = (torch.randn(1000, 151936, device="cuda", generator=generator) * 2).bfloat16().requires_grad_()
    labels = torch.randint(0, 151936, (1000,), device="cuda", generator=generator)
    weights = torch.randn(2, 1000, device="cuda", generator=generator)
    results = []
    for method in (fused_logprobs_and_entropy, eager_logprobs_and_entropy):
        logprobs, entropy = method(logits, labels)
        grad, = torch.autograd.grad((logprobs * weights[0]).sum() + (entropy * weights[1]).sum(), logits)
        results.append((logprobs, entropy, grad))
    (logprobs, entropy, grad), (eager_logprobs, eager_entropy, eager_grad) = results
    assert (logprobs - eager_logprobs).abs().max() < 1e-4 and (entropy - eager_entropy).abs().max() < 1e-4
    assert grad.dtype == torch.bfloat16
    assert (grad.float() - eager_grad.float()).abs().max() < 1e-2 * eager_grad.float().abs().max()

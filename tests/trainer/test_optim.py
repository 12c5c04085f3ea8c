"""The clipped optimizer step is queued without reading anything back (the gradient norm, the clip and the
skip flag stay on the device), and it steps as a clip followed by torch's AdamW would."""
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tests.cpu_ranks import run_on_cpu_ranks
from tests.trainer.test_offload import _gpt

MAX_NORM = 1e-3  # far below the test model's gradient norm, so the clip applies


class _ScalarReads(TorchDispatchMode):
    """Counts device-to-host reads (`.item()`, `float(t)`, `.tolist()`), each a host synchronisation on a GPU."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


def _queued_step(loss_finite: float):
    """(reads while queueing, stepped, grad norm, expected norm, largest difference from the reference
    weights, Adam step counts)."""
    from mmrl_megatron.config.schema import OptimizerConfig
    from mmrl_megatron.parallel import ParallelDims, start_processes
    from mmrl_megatron.trainer.optim import build_optimizer, queue_clipped_step, wrap_for_data_parallel

    device = torch.device("cpu")
    start_processes(ParallelDims(world_size=1), device)
    model = _gpt(device)
    chunks = wrap_for_data_parallel([model], model.config, use_distributed_optimizer=False)
    optimizer, _ = build_optimizer(chunks, OptimizerConfig(lr=1e-2, weight_decay=0.1), 1, bf16=False, device=device)
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(16).expand(2, -1)
    chunks[0](tokens, positions, attention_mask=None).square().mean().backward()
    chunks[0].finish_grad_sync()
    [inner] = [part.optimizer for part in getattr(optimizer, "chained_optimizers", [optimizer])]
    reference_groups = []
    for group in inner.param_groups:
        copies = [torch.nn.Parameter(p.detach().clone()) for p in group["params"]]
        for copy, p in zip(copies, group["params"]):
            copy.grad = p.main_grad.detach().clone()
        reference_groups.append((copies, group))
    grads = [copy.grad for copies, _ in reference_groups for copy in copies]
    expected = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))

    with _ScalarReads() as reads:
        read_step = queue_clipped_step(optimizer, MAX_NORM, torch.tensor(loss_finite))
    stepped, grad_norm = read_step()

    difference = 0.0
    for copies, group in reference_groups:
        if stepped:
            for copy in copies:
                copy.grad.mul_(MAX_NORM / (expected + 1e-6))
            torch.optim.AdamW(copies, lr=group["lr"], betas=group["betas"], eps=group["eps"],
                              weight_decay=group["weight_decay"], foreach=False, fused=False).step()
        for copy, p in zip(copies, group["params"]):
            difference = max(difference, float((copy.detach() - p.detach()).abs().max()))
    steps = sorted({float(state["step"]) for state in inner.state.values()})
    return reads.count, stepped, grad_norm, expected, difference, steps


def test_clipped_step_is_queued_without_reads_and_steps_as_clip_then_adamw():
    """Invariant: queueing the step reads nothing back (megatron-core's own norm without TE/apex read once per
    parameter tensor: 584 host synchronisations in the 3B step); reading it then gives the norm of all
    gradients (rel. 1e-6) and weights equal to an unfused AdamW step on gradients clipped to MAX_NORM
    (within 1e-6)."""
    [(reads, stepped, grad_norm, expected, difference, steps)] = run_on_cpu_ranks(1, _queued_step, 1.0)
    assert reads == 0
    assert stepped and steps == [1.0]
    assert abs(grad_norm - expected) <= 1e-6 * expected
    assert difference <= 1e-6


def test_non_finite_loss_skips_the_step():
    """Invariant: a non-finite loss (flag 0) leaves weights and Adam step counts untouched and reports a NaN
    norm, without a host read while queueing."""
    [(reads, stepped, grad_norm, _, difference, steps)] = run_on_cpu_ranks(1, _queued_step, 0.0)
    assert reads == 0
    assert not stepped and grad_norm != grad_norm
    assert difference == 0.0 and steps in ([], [0.0])

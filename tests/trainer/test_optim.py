"""The clipped optimizer step reads the gradient norm back once, not once per parameter tensor."""
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tests.cpu_ranks import run_on_cpu_ranks
from tests.trainer.test_offload import _gpt


class _ScalarReads(TorchDispatchMode):
    """Counts device-to-host scalar reads (`.item()`, `float(t)`), each a host synchronisation on a GPU."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


def _grad_norm_and_reads():
    from mmrl_megatron.config.schema import OptimizerConfig
    from mmrl_megatron.parallel import ParallelDims, start_processes
    from mmrl_megatron.trainer.optim import build_optimizer, wrap_for_data_parallel

    device = torch.device("cpu")
    start_processes(ParallelDims(world_size=1), device)
    model = _gpt(device)
    chunks = wrap_for_data_parallel([model], model.config, use_distributed_optimizer=False)
    optimizer, _ = build_optimizer(chunks, OptimizerConfig(), 1, bf16=False, device=device)
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(16).expand(2, -1)
    chunks[0](tokens, positions, attention_mask=None).square().mean().backward()
    chunks[0].finish_grad_sync()
    optimizer.prepare_grads()
    with _ScalarReads() as reads:
        norm = optimizer.get_grad_norm()
    grads = [p.grad for p in optimizer.get_parameters() if p.grad is not None]
    expected = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
    return norm, expected, reads.count, len(grads)


def test_gradient_norm_is_read_once():
    """Invariant: megatron-core's gradient norm without TE/apex costs one host read (its fallback made one per
    parameter tensor, 584 in the 3B optimizer step), and equals the norm of all gradients (rel. 1e-6)."""
    [(norm, expected, reads, tensors)] = run_on_cpu_ranks(1, _grad_norm_and_reads)
    assert tensors > 10
    assert reads == 1
    assert abs(norm - expected) <= 1e-6 * expected

"""Log-prob pass: this project's vocab-parallel log-probs and entropy (models/common/logprobs.py: the Triton
kernels of fused_logprobs.py on a GPU) against its chunked eager path and the naive full-vocabulary fp32
log_softmax, on the same logits, forward and backward.

Workload (default, the Qwen2.5-VL-3B output layer): 16,384 tokens of hidden 2048 through a 151,936-token
vocabulary; the bf16 logits [T, V] (4.6 GiB) are computed once, before anything is measured. Per method:
  forward   log p(label) and the entropy per token (fp32), as the actor's loss takes them
  backward  the gradient w.r.t. the logits of a per-token-weighted sum of the log-probs (a policy loss;
            the entropy is a statistic unless an entropy bonus is configured)
Memory is reported as what each phase adds over the memory in use once the logits exist (peak during the
phase minus that baseline). The naive path holds an fp32 [T, V] log-softmax (9.3 GiB at 16k tokens); the
chunked one at most one fp32 chunk of chunk_tokens rows; the fused kernels none. Target (issue 9): the
forward adds at most 2 GiB.

    python benchmarks/bench_logprob.py                    # on a GPU
    python benchmarks/bench_logprob.py --quick            # tiny shapes on the CPU (the smoke test runs it)
    python benchmarks/bench_logprob.py --quick --device cuda   # the same tiny run on a GPU, seconds

Prints one JSON line (every method, ours' ratios to the others, the largest log-prob and entropy differences
from the naive path) and a markdown row for benchmarks/RESULTS.md.
"""
import argparse
import json
import statistics
from typing import Callable, Dict, List, Optional, Tuple

import torch

from common import (GIB, PeakMemory, PhaseClock, allocated_bytes, command_line, device_name, markdown_row,
                    pick_device, utc_date)

# common (imported first) puts the repository root on sys.path
from mmrl_megatron.models.common.logprobs import (DEFAULT_CHUNK_TOKENS, eager_logprobs_and_entropy,
                                                  vocab_parallel_logprobs_and_entropy)

LogprobFn = Callable[[torch.Tensor, torch.Tensor], Tuple[torch.Tensor, torch.Tensor]]
TARGET_FORWARD_ADDED_GIB = 2.0


def naive_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The baseline a user writes first: fp32 log_softmax over the whole vocabulary, then gather."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return logp.gather(-1, labels[:, None]).squeeze(-1), -(logp.exp() * logp).sum(-1)


def make_inputs(tokens: int, vocab: int, hidden: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """(logits [T, V] leaf requiring grad, labels [T], per-token loss weights [T]) from a random output layer."""
    generator = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        states = torch.randn(tokens, hidden, generator=generator, device=device, dtype=dtype)
        weight = hidden ** -0.5 * torch.randn(vocab, hidden, generator=generator, device=device, dtype=dtype)
        logits = states @ weight.t()  # unit-scale logits
    labels = torch.randint(0, vocab, (tokens,), generator=generator, device=device)
    token_weights = torch.randn(tokens, generator=generator, device=device)
    return logits.requires_grad_(), labels, token_weights


def _forward_backward(logprob_fn: LogprobFn, logits, labels, token_weights, clock: PhaseClock):
    """((log-probs, entropy), peak bytes of the forward, peak bytes of the backward), timing both phases on
    `clock`."""
    with PeakMemory(logits.device) as forward_memory:
        clock.mark("forward")
        logprobs, entropy = logprob_fn(logits, labels)
        clock.stop()
    with PeakMemory(logits.device) as backward_memory:
        clock.mark("backward")
        torch.autograd.grad((logprobs * token_weights).sum(), logits)
        clock.stop()
    return (logprobs.detach(), entropy.detach()), forward_memory.peak_bytes, backward_memory.peak_bytes


def measure(logprob_fn: LogprobFn, logits: torch.Tensor, labels: torch.Tensor, token_weights: torch.Tensor,
            repeats: int) -> Dict:
    """Median forward/backward milliseconds over `repeats` and the most memory each adds over the baseline
    (the logits), after one warm-up (first-call work such as lazy imports is not the method's cost)."""
    device = logits.device
    _forward_backward(logprob_fn, logits, labels, token_weights, PhaseClock(device))
    baseline = allocated_bytes(device)
    forward, backward, forward_peak, backward_peak = [], [], 0, 0
    for _ in range(repeats):
        clock = PhaseClock(device)
        logprobs, forward_bytes, backward_bytes = _forward_backward(logprob_fn, logits, labels, token_weights, clock)
        seconds = clock.seconds_per_phase()
        forward.append(seconds["forward"])
        backward.append(seconds["backward"])
        forward_peak, backward_peak = max(forward_peak, forward_bytes), max(backward_peak, backward_bytes)
    return dict(forward_ms=1e3 * statistics.median(forward), backward_ms=1e3 * statistics.median(backward),
                forward_added_gib=max(forward_peak - baseline, 0) / GIB,
                backward_added_gib=max(backward_peak - baseline, 0) / GIB, values=logprobs)


def _ratio(numerator: float, denominator: float) -> Optional[float]:
    return round(numerator / denominator, 3) if denominator > 0 else None


def run(args, device: torch.device) -> Dict:
    dtype = getattr(torch, args.dtype)
    logits, labels, token_weights = make_inputs(args.tokens, args.vocab, args.hidden, dtype, device)
    methods = {"ours": lambda x, y: vocab_parallel_logprobs_and_entropy(x, y, chunk_tokens=args.chunk_tokens),
               "chunked": lambda x, y: eager_logprobs_and_entropy(x, y, chunk_tokens=args.chunk_tokens),
               "naive": naive_logprobs}
    results = {name: measure(fn, logits, labels, token_weights, args.repeats) for name, fn in methods.items()}
    values = {name: figures.pop("values") for name, figures in results.items()}
    differences = {f"{name}_max_abs_{kind}_difference": float((mine - reference).abs().max())
                   for name in ("ours", "chunked")
                   for kind, mine, reference in zip(("logprob", "entropy"), values[name], values["naive"])}
    row = dict(benchmark="logprob", device=device_name(device), dtype=args.dtype, tokens=args.tokens,
               vocab=args.vocab, hidden=args.hidden, chunk_tokens=args.chunk_tokens,
               logits_gib=round(logits.numel() * logits.element_size() / GIB, 3),
               target_forward_added_gib=TARGET_FORWARD_ADDED_GIB, **differences)
    for name, figures in results.items():
        row.update({f"{name}_{key}": round(value, 3) for key, value in figures.items()})
    ours = results["ours"]
    for name in ("chunked", "naive"):
        row.update({f"forward_speedup_over_{name}": _ratio(results[name]["forward_ms"], ours["forward_ms"]),
                    f"backward_speedup_over_{name}": _ratio(results[name]["backward_ms"], ours["backward_ms"])})
    row["forward_memory_ratio"] = _ratio(results["naive"]["forward_added_gib"], ours["forward_added_gib"])
    return row


def results_row(row: Dict, argv: Optional[List[str]]) -> str:
    def figures(name: str) -> str:
        return (f"fwd {row[f'{name}_forward_ms']} ms +{row[f'{name}_forward_added_gib']} GiB, "
                f"bwd {row[f'{name}_backward_ms']} ms +{row[f'{name}_backward_added_gib']} GiB")

    return markdown_row([
        utc_date(), row["device"],
        f"log-probs + entropy {row['tokens']} x {row['vocab']} "
        f"({row['dtype']} logits, chunks of {row['chunk_tokens']})",
        f"ours: {figures('ours')}",
        f"chunked eager: {figures('chunked')}; naive fp32 log_softmax: {figures('naive')}",
        f"{row['forward_speedup_over_chunked']}x fwd / {row['backward_speedup_over_chunked']}x bwd over chunked, "
        f"{row['forward_speedup_over_naive']}x / {row['backward_speedup_over_naive']}x over naive, "
        f"{row['forward_memory_ratio']}x less fwd memory than naive "
        f"(target: fwd adds <= {TARGET_FORWARD_ADDED_GIB} GiB)",
        f"`{command_line('bench_logprob.py', argv)}`"])


def parse_args(argv: Optional[List[str]]):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny shapes, CPU unless --device cuda (smoke test)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--hidden", type=int, default=2048, help="width of the output layer producing the logits")
    parser.add_argument("--chunk-tokens", type=int, default=DEFAULT_CHUNK_TOKENS)
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16", help="dtype of the logits")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats after one warm-up")
    args = parser.parse_args(argv)
    if args.quick:
        args.tokens, args.vocab, args.hidden, args.chunk_tokens, args.repeats = 1024, 8192, 64, 128, 2
    return args


def main(argv: Optional[List[str]] = None) -> Dict:
    args = parse_args(argv)
    row = run(args, pick_device(args.device, args.quick))
    print(json.dumps(row), flush=True)
    print(results_row(row, argv))
    return row


if __name__ == "__main__":
    main()

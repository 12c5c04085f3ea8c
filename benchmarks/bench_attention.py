"""Packed attention kernels: the trainer's choice (core_attention.packed_attention: one batched SDPA when every
packed sequence has one length, torch's varlen flash kernel otherwise) against the varlen kernel alone and the
exact per-sequence SDPA loop, on the same bf16 tensors, forward and forward + backward.

Workloads (Qwen2.5-VL-3B widths):
  fixed    2 x 2048 tokens, causal, 16 query / 2 key-value heads of 128 (bench_train's fixed micro-batch)
  ragged   18 causal sequences of RL-like lengths (seeded, log-uniform 128..2048), same heads
  windows  16 images of 16 windows of 64 patches, bidirectional, 16 heads of 80 (the vision tower's window layers)
  images   16 images of 1,024 patches, bidirectional, 16 heads of 80 (its full-attention layers)

    python benchmarks/bench_attention.py            # on a GPU
    python benchmarks/bench_attention.py --quick    # tiny shapes on the CPU (the smoke test runs it)

Prints one JSON line per workload (milliseconds per method, ours' speedups, the largest output difference from
the per-sequence loop) and a markdown row each for benchmarks/RESULTS.md.
"""
import argparse
import math
import statistics
import time
from typing import Callable, Dict, List, Optional

import torch

from common import command_line, device_name, markdown_row, pick_device, print_rows, synchronize, utc_date

# common (imported first) puts the repository root on sys.path
from mmrl_megatron.models.common.core_attention import packed_core_attention, sequence_attention, varlen_attention
from mmrl_megatron.models.common.packing import packed_segments


def _ragged_lengths(count: int, low: int, high: int, seed: int = 0) -> List[int]:
    generator = torch.Generator().manual_seed(seed)
    draws = torch.rand(count, generator=generator)
    return [int(math.exp(math.log(low) + float(u) * (math.log(high) - math.log(low)))) for u in draws]


def workloads(quick: bool) -> Dict[str, Dict]:
    scale = 16 if quick else 1
    return {
        "fixed": dict(lengths=[2048 // scale] * 2, heads=16, groups=2, width=128, causal=True),
        "ragged": dict(lengths=_ragged_lengths(18, 128 // scale, 2048 // scale), heads=16, groups=2, width=128,
                       causal=True),
        "windows": dict(lengths=[64 // scale] * (256 // scale), heads=16, groups=16, width=80, causal=False),
        "images": dict(lengths=[1024 // scale] * 16, heads=16, groups=16, width=80, causal=False),
    }


def ours_attention(query, key, value, params, causal, scale):
    """What TorchCoreAttention runs for packed input at inference: its GPU kernels, or the per-sequence loop."""
    return packed_core_attention(query, key, value, params, causal, scale, dropout=0.0)


def segments_attention(query, key, value, params, causal, scale):
    """The exact reference: one SDPA per sequence."""
    return sequence_attention(query, key, value, params.bounds, causal, scale, dropout=0.0)


def _time_ms(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median milliseconds of `fn` over `repeats` after one warm-up (kernel selection, plans): CUDA events on
    a GPU, the wall clock elsewhere."""
    fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - begin))
    return statistics.median(times)


def run_workload(name: str, spec: Dict, device: torch.device, dtype: torch.dtype, repeats: int) -> Dict:
    lengths = spec["lengths"]
    total = sum(lengths)
    params = packed_segments([0] + torch.tensor(lengths).cumsum(0).tolist(), device)
    generator = torch.Generator(device).manual_seed(0)
    shapes = [(total, spec["heads"], spec["width"]), (total, spec["groups"], spec["width"]),
              (total, spec["groups"], spec["width"])]
    tensors = [torch.randn(*shape, device=device, dtype=dtype, generator=generator).requires_grad_()
               for shape in shapes]
    scale = spec["width"] ** -0.5
    methods = {"ours": ours_attention, "varlen": varlen_attention, "segments": segments_attention}
    if device.type != "cuda":
        methods.pop("varlen")  # the varlen kernel exists on CUDA only
    row = dict(benchmark="attention", workload=name, device=device_name(device), sequences=len(lengths), tokens=total,
               heads=spec["heads"], kv_heads=spec["groups"], head_dim=spec["width"], causal=spec["causal"])
    outputs = {}
    for method, fn in methods.items():
        def forward():
            with torch.no_grad():
                return fn(*tensors, params, spec["causal"], scale)

        def forward_backward():
            out = fn(*tensors, params, spec["causal"], scale)
            torch.autograd.grad(out.float().square().sum(), tensors)

        outputs[method] = forward()
        row[f"{method}_forward_ms"] = round(_time_ms(forward, device, repeats), 3)
        row[f"{method}_forward_backward_ms"] = round(_time_ms(forward_backward, device, repeats), 3)
    for method in methods:
        if method != "ours":
            row[f"forward_speedup_over_{method}"] = round(row[f"{method}_forward_ms"] / row["ours_forward_ms"], 3)
            row[f"forward_backward_speedup_over_{method}"] = round(
                row[f"{method}_forward_backward_ms"] / row["ours_forward_backward_ms"], 3)
        row[f"{method}_max_abs_difference"] = float((outputs[method].float() - outputs["segments"].float()).abs().max())
    return row


def results_row(row: Dict, argv: Optional[List[str]]) -> str:
    others = [m for m in ("varlen", "segments") if f"{m}_forward_ms" in row]
    return markdown_row([
        utc_date(), row["device"],
        f"attention {row['workload']}: {row['sequences']} sequences, {row['tokens']} tokens, "
        f"{row['heads']}/{row['kv_heads']} heads of {row['head_dim']}, "
        f"{'causal' if row['causal'] else 'bidirectional'}",
        f"ours: fwd {row['ours_forward_ms']} ms, fwd+bwd {row['ours_forward_backward_ms']} ms",
        "; ".join(f"{m}: fwd {row[f'{m}_forward_ms']} ms, fwd+bwd {row[f'{m}_forward_backward_ms']} ms"
                  for m in others),
        "; ".join(f"{row[f'forward_speedup_over_{m}']}x / {row[f'forward_backward_speedup_over_{m}']}x over {m}"
                  for m in others),
        f"`{command_line('bench_attention.py', argv)}`"])


def main(argv: Optional[List[str]] = None) -> List[Dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny shapes, CPU unless --device cuda")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    device = pick_device(args.device, args.quick)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = [run_workload(name, spec, device, dtype, 2 if args.quick else args.repeats)
            for name, spec in workloads(args.quick).items()]
    print_rows(rows, results_row, argv)
    return rows


if __name__ == "__main__":
    main()

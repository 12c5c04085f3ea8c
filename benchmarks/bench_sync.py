"""Weight-sync speed: the actor's megatron shards -> the bridge -> the embedded engine, on a random checkpoint.

    python benchmarks/bench_sync.py                                       # Qwen2.5-VL-7B shape, one GPU
    torchrun --nproc_per_node 2 benchmarks/bench_sync.py --tp 2           # actor at TP=2, engine on rank 0
    python benchmarks/bench_sync.py --quick                               # tiny model on the CPU (smoke test)

Each repeat is one WeightBridge.sync() (gather over TP/PP, convert, bucket, push); the first is a warm-up.
After the last sync the bridge verifies sampled engine tensors bit for bit. Prints one JSON line and a
markdown row for benchmarks/RESULTS.md (median seconds, GB moved, GB/s).
"""
import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_convert import write_random_checkpoint  # noqa: E402
from common import significant  # noqa: E402

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def run(args, hf_dir: str) -> Optional[Dict]:
    """Sync args.repeats times; the measurements on global rank 0, None elsewhere (collective)."""
    from mmrl_megatron.bridge import WeightBridge
    from mmrl_megatron.models import build_model_from_dir
    from mmrl_megatron.parallel import ParallelDims, detect_process_place, pick_device, start_processes
    from mmrl_megatron.rollout.embedded import EmbeddedEngine

    device = pick_device()
    dims = start_processes(ParallelDims(detect_process_place().world_size, tensor=args.tp, pipeline=args.pp), device)
    if dist.get_rank() == 0:
        write_random_checkpoint(hf_dir, args.shape, _DTYPES[args.dtype])
    dist.barrier()
    model = build_model_from_dir(hf_dir, dims, device=device)
    engine = EmbeddedEngine(hf_dir, device, dtype=_DTYPES[args.dtype]) if dist.get_rank() == 0 else None
    bridge = WeightBridge([model], engine, bucket_bytes=args.bucket_mb << 20, dims=dims)
    stats = [bridge.sync() for _ in range(args.repeats + 1)][1:]
    verified = bridge.verify(num_tensors=16)
    if dist.get_rank() != 0:
        return None
    seconds = statistics.median(s.seconds for s in stats)
    return {"shape": args.shape, "dtype": args.dtype, "tp": args.tp, "pp": args.pp, "bucket_mb": args.bucket_mb,
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "seconds_median": significant(seconds), "gigabytes": significant(stats[0].gigabytes),
            "gb_per_s": significant(stats[0].gigabytes / seconds), "tensors": stats[0].tensors,
            "buckets": stats[0].buckets, "verified_tensors": len(verified)}


def markdown_row(results: Dict) -> str:
    command = (f"torchrun --nproc_per_node {results['tp'] * results['pp']} benchmarks/bench_sync.py "
               f"--shape {results['shape']} --tp {results['tp']} --pp {results['pp']}")
    return (f"| {datetime.date.today()} | {results['device']} | weight sync {results['shape']} {results['dtype']} "
            f"TP={results['tp']} PP={results['pp']} | {results['seconds_median']} s, {results['gigabytes']} GB, "
            f"{results['gb_per_s']} GB/s ({results['buckets']} buckets of {results['bucket_mb']} MB) | `{command}` |")


def main(argv: Optional[List[str]] = None) -> Optional[Dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=["tiny", "3b", "7b"], default="7b")
    parser.add_argument("--quick", action="store_true", help="tiny model, fp32, CPU smoke run")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="bfloat16")
    parser.add_argument("--bucket-mb", type=int, default=512, help="rollout.sync_bucket_mb")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work-dir", default=None, help="shared directory for the random checkpoint")
    args = parser.parse_args(argv)
    if args.quick:
        args.shape, args.dtype, args.repeats, args.bucket_mb = "tiny", "float32", 2, 1
    from mmrl_megatron.parallel import shutdown

    # every rank must see the same checkpoint directory: a fixed path under --work-dir, or the cwd's temp
    work_dir = args.work_dir or tempfile.gettempdir()
    hf_dir = os.path.join(work_dir, f"bench_sync_{args.shape}_{args.dtype}_{os.environ.get('MASTER_PORT', '0')}")
    try:
        results = run(args, hf_dir)
    finally:
        shutdown()
    if results is not None:
        import shutil

        shutil.rmtree(hf_dir, ignore_errors=True)
        print(json.dumps(results))
        print(markdown_row(results))
    return results


if __name__ == "__main__":
    main()

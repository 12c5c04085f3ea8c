"""Checkpoint conversion speed and memory: HF -> megatron -> HF on a randomly initialised checkpoint.

    python benchmarks/bench_convert.py                    # Qwen2.5-VL-7B shape (about 15 GB in bf16), CPU
    python benchmarks/bench_convert.py --shape 3b
    python benchmarks/bench_convert.py --quick            # tiny model, seconds (the smoke test runs it)

Writes a random HF checkpoint of the published geometry (streamed, one tensor at a time), converts it
with the same functions as tools/checkpoint_convert/, checks the round trip tensor by tensor
(torch.equal) and prints one JSON line and a markdown row for benchmarks/RESULTS.md: seconds, GB/s
(checkpoint bytes / seconds) and peak memory of each direction (this process and its checkpoint-writing
children, sampled; see common.ProcessTreePeakMemory).
"""
import argparse
import datetime
import json
import os
import re
import sys
import tempfile
import time
from typing import Dict, Iterator, List, Optional, Tuple

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_rollout import build_config  # noqa: E402  (the published 3B/7B geometries, kept in one place)
from common import ProcessTreePeakMemory, significant  # noqa: E402

# transformers' in-memory module names -> the hub names checkpoints are saved under
_MODULE_TO_CHECKPOINT = [(re.compile(r"^model\.visual\."), "visual."), (re.compile(r"^model\.language_model\."), "model.")]


def checkpoint_tensor_specs(config) -> List[Tuple[str, Tuple[int, ...]]]:
    """(hub name, shape) of every tensor a saved checkpoint of `config` holds (built on the meta device)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(config)
    specs = []
    for name, parameter in model.named_parameters():  # tied lm_head is deduplicated, as save_pretrained does
        for pattern, replacement in _MODULE_TO_CHECKPOINT:
            name = pattern.sub(replacement, name, count=1)
        specs.append((name, tuple(parameter.shape)))
    return specs


def write_random_checkpoint(out_dir: str, shape: str, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> str:
    """A complete HF directory of the `shape` geometry with random weights, written one tensor at a time."""
    from mmrl_megatron.convert.checkpoint_io import write_hf_safetensors
    from mmrl_megatron.models.qwen2_5_vl.tiny import build_byte_tokenizer, write_preprocessor_config

    config = build_config(shape)
    config.dtype = dtype
    # drawn on the GPU when there is one: CPU draws for a 7B checkpoint take about a minute
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    generator = torch.Generator(device).manual_seed(seed)

    def tensors() -> Iterator[Tuple[str, torch.Tensor]]:
        for name, tensor_shape in checkpoint_tensor_specs(config):
            yield name, (0.02 * torch.randn(tensor_shape, generator=generator, device=device)).to(dtype).cpu()

    write_hf_safetensors(tensors(), out_dir)
    config.save_pretrained(out_dir)
    build_byte_tokenizer().save_pretrained(out_dir)
    write_preprocessor_config(out_dir, config)
    return out_dir


def safetensors_bytes(directory: str) -> int:
    return sum(os.path.getsize(os.path.join(directory, name)) for name in os.listdir(directory)
               if name.endswith(".safetensors"))


def _tensor_locations(directory: str) -> Dict[str, str]:
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as handle:
            return {name: os.path.join(directory, file) for name, file in json.load(handle)["weight_map"].items()}
    from safetensors import safe_open

    path = os.path.join(directory, "model.safetensors")
    with safe_open(path, framework="pt") as handle:
        return {name: path for name in handle.keys()}


def first_difference(dir_a: str, dir_b: str) -> Optional[str]:
    """None when both directories hold the same tensor names with bit-equal values, else what differs."""
    from safetensors import safe_open

    locations_a, locations_b = _tensor_locations(dir_a), _tensor_locations(dir_b)
    if set(locations_a) != set(locations_b):
        return f"names differ: {sorted(set(locations_a) ^ set(locations_b))[:5]}"
    for name in sorted(locations_a):
        with safe_open(locations_a[name], framework="pt") as a, safe_open(locations_b[name], framework="pt") as b:
            if not torch.equal(a.get_tensor(name), b.get_tensor(name)):
                return f"tensor {name} differs"
    return None


def run(shape: str, work_dir: str, max_chunk_bytes: int) -> Dict:
    from mmrl_megatron.models.checkpoint_conversion import convert_hf_to_mcore, convert_mcore_to_hf
    from mmrl_megatron.parallel import ParallelDims, detect_process_place, pick_device, shutdown, start_processes

    hf_dir, mcore_dir, back_dir = (os.path.join(work_dir, name) for name in ("hf", "mcore", "hf_back"))
    write_random_checkpoint(hf_dir, shape)
    checkpoint_gb = safetensors_bytes(hf_dir) / 1e9
    device = pick_device()
    dims = start_processes(ParallelDims(detect_process_place().world_size), device)
    try:
        results = {"shape": shape, "checkpoint_gb": significant(checkpoint_gb),
                   "max_chunk_gb": significant(max_chunk_bytes / 1e9)}
        for direction, convert in [
                ("hf_to_mcore", lambda: convert_hf_to_mcore(hf_dir, mcore_dir, dims, device,
                                                            max_chunk_bytes=max_chunk_bytes)),
                ("mcore_to_hf", lambda: convert_mcore_to_hf(mcore_dir, back_dir, dims, device,
                                                            max_chunk_bytes=max_chunk_bytes))]:
            with ProcessTreePeakMemory() as memory:
                start = time.perf_counter()
                convert()
                seconds = time.perf_counter() - start
            results[direction] = {"seconds": significant(seconds), "gb_per_s": significant(checkpoint_gb / seconds),
                                  "peak_pss_gb": significant(memory.peak_bytes / 1e9)}
    finally:
        shutdown()
    results["round_trip_difference"] = first_difference(hf_dir, back_dir)
    return results


def markdown_row(results: Dict) -> str:
    there, back = results["hf_to_mcore"], results["mcore_to_hf"]
    return (f"| {datetime.date.today()} | CPU | convert {results['shape']} ({results['checkpoint_gb']} GB), "
            f"chunks of {results['max_chunk_gb']} GB | "
            f"HF->mcore {there['seconds']} s, {there['gb_per_s']} GB/s, peak memory (PSS) {there['peak_pss_gb']} GB; "
            f"mcore->HF {back['seconds']} s, {back['gb_per_s']} GB/s, peak memory (PSS) {back['peak_pss_gb']} GB | "
            f"`python benchmarks/bench_convert.py --shape {results['shape']} --max-chunk-gb {results['max_chunk_gb']}` |")


def main(argv: Optional[List[str]] = None) -> Dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=["tiny", "3b", "7b"], default="7b")
    parser.add_argument("--quick", action="store_true", help="the tiny model (CPU smoke run)")
    parser.add_argument("--work-dir", default=None, help="where the checkpoints go (default: a temporary directory)")
    parser.add_argument("--max-chunk-gb", type=float, default=5.0, help="the converters' memory bound (their default)")
    args = parser.parse_args(argv)
    shape = "tiny" if args.quick else args.shape
    with tempfile.TemporaryDirectory(dir=args.work_dir) as work_dir:
        results = run(shape, work_dir, int(args.max_chunk_gb * 1e9))
    print(json.dumps(results))
    print(markdown_row(results))
    if results["round_trip_difference"]:
        raise SystemExit(f"round trip is not exact: {results['round_trip_difference']}")
    return results


if __name__ == "__main__":  # dist_checkpointing may spawn helper processes, which re-import this file
    main()

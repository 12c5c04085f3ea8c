"""Data-path throughput: decode + process + pack for prompts with one 448x448 image each.

Writes N verl-format rows (JPEG images, 448x448 -> 32x32 patches -> 256 image tokens with Qwen2.5-VL's
14-px patches and merge 2) to a temporary parquet file, then times, on this machine's CPU:
  decode   PIL decoding of every image alone (part of process, shown for the breakdown)
  process  PromptDataset iteration: row parsing, decoding, image processor, chat template, pad expansion
  pack     concatenating each batch into one packed sequence: ids, M-RoPE positions, pixel values, cu_seqlens
The tokenizer and processor come from the tiny checkpoint (same image processor class as the real models).

    python benchmarks/bench_data.py            # 1024 samples
    python benchmarks/bench_data.py --quick    # 64 samples, a smoke run
Prints one JSON line and a markdown row for benchmarks/RESULTS.md.
"""
import argparse
import datetime
import io
import json
import os
import platform
import random
import sys
import tempfile
import time
from typing import Dict, List

import torch
from PIL import Image, ImageDraw

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mmrl_megatron.config.schema import DataConfig  # noqa: E402
from mmrl_megatron.data import PromptDataset, PromptSample, rope_positions  # noqa: E402
from mmrl_megatron.data.format import make_row, write_rows  # noqa: E402
from mmrl_megatron.data.images import decode_images  # noqa: E402
from mmrl_megatron.models.qwen2_5_vl.tiny import build_tiny_checkpoint  # noqa: E402


def synthetic_jpeg(rng: random.Random, size: int) -> bytes:
    """A photo-sized JPEG with gradients and shapes, so decoding costs what real figures cost."""
    image = Image.linear_gradient("L").resize((size, size)).convert("RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        x, y, r = rng.randrange(size), rng.randrange(size), rng.randrange(8, size // 4)
        draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(rng.randrange(256) for _ in range(3)))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def pack(samples: List[PromptSample], merge_size: int, image_token_id: int, vision_start_token_id: int) -> Dict:
    """One packed sequence for a batch: what the trainer feeds the model for prompts."""
    ids = [torch.tensor(sample.prompt_ids) for sample in samples]
    positions = [rope_positions(sample_ids, sample.image_grid_thw, merge_size, image_token_id, vision_start_token_id)
                 for sample_ids, sample in zip(ids, samples)]
    lengths = torch.tensor([0] + [len(sample_ids) for sample_ids in ids])
    return {"input_ids": torch.cat(ids)[None], "position_ids": torch.cat(positions, dim=1)[:, None],
            "cu_seqlens": torch.cumsum(lengths, 0).int(),
            "pixel_values": torch.cat([sample.pixel_values for sample in samples]),
            "image_grid_thw": torch.cat([sample.image_grid_thw for sample in samples])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=1024)
    parser.add_argument("--image-size", type=int, default=448)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--quick", action="store_true", help="64 samples")
    args = parser.parse_args()
    samples = 64 if args.quick else args.samples
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as workdir:
        model_dir = build_tiny_checkpoint(os.path.join(workdir, "model"))
        images = [synthetic_jpeg(rng, args.image_size) for _ in range(16)]
        rows = [make_row(f"Problem {i}: find the measure of angle x. Think step by step, then answer in \\boxed{{}}.",
                         [images[i % len(images)]], str(i), "bench") for i in range(samples)]
        path = os.path.join(workdir, "bench.parquet")
        write_rows(path, rows, row_group_size=256)

        started = time.perf_counter()
        for row in rows:
            decode_images([row["images"][0]["bytes"]])
        decode_s = time.perf_counter() - started

        dataset = PromptDataset([path], DataConfig(max_prompt_length=4096), model_dir, args.batch_size, train=False)
        processor = dataset.processor
        process_s = pack_s = 0.0
        tokens = count = 0
        started = time.perf_counter()
        for batch in dataset:
            batch_ready = time.perf_counter()
            packed = pack(batch, processor.merge_size, processor.image_token_id, processor.vision_start_token_id)
            packed_at = time.perf_counter()
            process_s += batch_ready - started
            pack_s += packed_at - batch_ready
            tokens += packed["input_ids"].shape[1]
            count += len(batch)
            started = time.perf_counter()
    total_s = process_s + pack_s
    result = {"samples": count, "image_size": args.image_size, "image_tokens_per_sample":
              int(packed["image_grid_thw"][0].prod()) // processor.merge_size ** 2,
              "decode_s": round(decode_s, 3), "process_s": round(process_s, 3), "pack_s": round(pack_s, 3),
              "samples_per_s": round(count / total_s, 1), "tokens_per_s": round(tokens / total_s, 1),
              "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "cpu": platform.processor()}
    print(json.dumps(result))
    print(f"| {datetime.date.today()} | bench_data | {os.cpu_count()} CPU cores | "
          f"`python benchmarks/bench_data.py{' --quick' if args.quick else ''}` | "
          f"{result['samples_per_s']} samples/s ({result['tokens_per_s']} tokens/s); decode {result['decode_s']} s, "
          f"process {result['process_s']} s, pack {result['pack_s']} s for {count} samples |")


if __name__ == "__main__":
    main()

"""Rollout throughput: the embedded engine against Hugging Face generate, same weights, same process.

Workloads (random weights; every request gets exactly --new-tokens tokens, sampled at temperature 1):
  text   Qwen2.5-VL-3B shape, N requests x P prompt tokens
  image  Qwen2.5-VL-7B shape, the same plus one 448x448 image (256 image tokens) per prompt
Defaults: 256 requests x 256 prompt + 256 new tokens, the acceptance workload of issue 6.
`--quick` runs a tiny model on the CPU in seconds (the smoke test runs it).

    python benchmarks/bench_rollout.py                 # on a GPU, both workloads
    python benchmarks/bench_rollout.py --quick         # CPU smoke run
Prints one JSON line per workload and a markdown row for benchmarks/RESULTS.md.
"""
import argparse
import datetime
import inspect
import json
import os
import sys
import tempfile
import time
from typing import Dict, List, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mmrl_megatron.rollout import RolloutRequest, SamplingParams  # noqa: E402
from mmrl_megatron.rollout.embedded import EmbeddedEngine  # noqa: E402

VISION_QWEN = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14,
                   spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31],
                   tokens_per_second=2)
TEXT_SHAPES = {
    "3b": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
               num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
}
WORKLOADS = {"text": "3b", "image": "7b"}


def build_config(shape: str):
    """A Qwen2_5_VLConfig of the published geometry (`shape` 3b/7b) or the tests' tiny one ("tiny")."""
    from mmrl_megatron.models.qwen2_5_vl.tiny import build_byte_tokenizer, config_with_tokenizer_ids, tiny_config

    if shape == "tiny":
        return tiny_config(build_byte_tokenizer())
    text = dict(TEXT_SHAPES[shape], max_position_embeddings=32768, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]})
    vision = dict(VISION_QWEN, out_hidden_size=text["hidden_size"])
    # special token ids of the byte tokenizer that benchmark checkpoints are saved with (tiny.py)
    return config_with_tokenizer_ids(text, vision, build_byte_tokenizer())


def make_requests(config, count: int, prompt_tokens: int, image_size: Optional[int], seed: int = 0) -> List[RolloutRequest]:
    """Random text prompts, each optionally preceded by one image of image_size x image_size pixels."""
    generator = torch.Generator().manual_seed(seed)
    text_vocab = min(config.text_config.vocab_size, config.image_token_id) - 16  # stay clear of special tokens
    vision = config.vision_config
    requests = []
    for _ in range(count):
        text = torch.randint(0, text_vocab, (prompt_tokens,), generator=generator).tolist()
        if image_size is None:
            requests.append(RolloutRequest(text))
            continue
        side = image_size // vision.patch_size
        pads = side * side // vision.spatial_merge_size ** 2
        pixel_values = torch.randn(side * side, 3 * vision.temporal_patch_size * vision.patch_size ** 2,
                                   generator=generator)
        ids = [config.vision_start_token_id] + [config.image_token_id] * pads + [config.vision_end_token_id] + text
        requests.append(RolloutRequest(ids, pixel_values, torch.tensor([[1, side, side]])))
    return requests


def hf_generate_seconds(model, requests: List[RolloutRequest], new_tokens: int, device: torch.device) -> float:
    """Wall time of one batched HF generate over all requests (left-padded), new_tokens forced."""
    length = max(len(request.prompt_ids) for request in requests)
    input_ids = torch.zeros(len(requests), length, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, request in enumerate(requests):
        input_ids[row, length - len(request.prompt_ids):] = torch.tensor(request.prompt_ids)
        attention_mask[row, length - len(request.prompt_ids):] = 1
    inputs = dict(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device))
    if requests[0].pixel_values is not None:
        inputs.update(pixel_values=torch.cat([r.pixel_values for r in requests]).to(device, model.dtype),
                      image_grid_thw=torch.cat([r.image_grid_thw for r in requests]).to(device))
        if "mm_token_type_ids" in inspect.signature(model.model.get_rope_index).parameters:
            inputs["mm_token_type_ids"] = (inputs["input_ids"] == model.config.image_token_id).int()
    _synchronize(device)
    start = time.perf_counter()
    with torch.no_grad():
        model.generate(**inputs, do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, pad_token_id=0)
    _synchronize(device)
    return time.perf_counter() - start


def engine_generate_seconds(engine: EmbeddedEngine, requests: List[RolloutRequest], new_tokens: int,
                            device: torch.device) -> float:
    sampling = SamplingParams(n=1, temperature=1.0, max_new_tokens=new_tokens, ignore_eos=True, seed=0)
    _synchronize(device)
    start = time.perf_counter()
    results = engine.generate(requests, sampling)
    _synchronize(device)
    seconds = time.perf_counter() - start
    produced = sum(len(result.response_ids) for result in results)
    if produced != len(requests) * new_tokens:
        raise RuntimeError(f"engine produced {produced} tokens, expected {len(requests) * new_tokens}")
    return seconds


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_workload(name: str, args, device: torch.device, dtype: torch.dtype) -> Dict:
    from transformers import Qwen2_5_VLForConditionalGeneration

    shape = "tiny" if args.quick else WORKLOADS[name]
    config = build_config(shape)
    image_size = (56 if args.quick else args.image_size) if name == "image" else None
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation="sdpa").eval()
    with tempfile.TemporaryDirectory() as config_dir:
        config.save_pretrained(config_dir)
        engine = EmbeddedEngine(config_dir, device, dtype, max_batch_size=args.requests)
    engine.update_weights([list(model.named_parameters())])  # module names pass through unchanged
    requests = make_requests(config, args.requests, args.prompt_tokens, image_size)
    warmup = requests[:2]

    engine_generate_seconds(engine, requests, args.new_tokens, device)  # captures the decode graphs it will replay
    engine_seconds = engine_generate_seconds(engine, requests, args.new_tokens, device)
    new_tokens = args.requests * args.new_tokens
    row = dict(workload=name, shape=shape, device=str(torch.cuda.get_device_name(device) if device.type == "cuda"
                                                     else "cpu"), dtype=str(dtype).replace("torch.", ""),
               requests=args.requests, prompt_tokens=len(requests[0].prompt_ids), new_tokens=args.new_tokens,
               engine_seconds=round(engine_seconds, 3), engine_tokens_per_s=round(new_tokens / engine_seconds, 1))
    engine.shutdown()
    del engine
    if not args.skip_hf:
        hf_generate_seconds(model, warmup, 4, device)
        hf_seconds = hf_generate_seconds(model, requests, args.new_tokens, device)
        row.update(hf_seconds=round(hf_seconds, 3), hf_tokens_per_s=round(new_tokens / hf_seconds, 1),
                   speedup=round(hf_seconds / engine_seconds, 2))
    return row


def parse_args(argv: Optional[List[str]]):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model on CPU, a few requests (smoke test)")
    parser.add_argument("--workload", choices=["text", "image", "both"], default="both")
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--prompt-tokens", type=int, default=256, help="text tokens per prompt (image tokens extra)")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=448)
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default=None, help="default: bf16 on GPU, fp32 on CPU")
    parser.add_argument("--skip-hf", action="store_true", help="time only the engine")
    args = parser.parse_args(argv)
    if args.quick:
        args.requests, args.prompt_tokens, args.new_tokens = 4, 8, 8
    return args


def main(argv: Optional[List[str]] = None) -> List[Dict]:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    rows = []
    for name in (["text", "image"] if args.workload == "both" else [args.workload]):
        row = run_workload(name, args, device, dtype)
        rows.append(row)
        print(json.dumps(row), flush=True)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    for row in rows:
        print(f"| {date} | {row['device']} | {row['workload']} ({row['shape']}, {row['dtype']}) | "
              f"{row['requests']} x {row['prompt_tokens']}+{row['new_tokens']} | {row.get('hf_tokens_per_s', '-')} | "
              f"{row['engine_tokens_per_s']} | {row.get('speedup', '-')}x | `python benchmarks/bench_rollout.py "
              f"{' '.join(argv if argv is not None else sys.argv[1:])}` |")
    return rows


if __name__ == "__main__":
    main()

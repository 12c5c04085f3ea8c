"""Rollout throughput: the embedded engine against Hugging Face generate, same weights, same process.

Workloads (random weights, sampled at temperature 1):
  text   Qwen2.5-VL-3B shape, N requests x P prompt tokens, every request exactly --new-tokens new tokens
  image  Qwen2.5-VL-7B shape, the same plus one 448x448 image (256 image tokens) per prompt
  rl     RL-shaped: Qwen2.5-VL-3B, --rl-prompts prompts x n=5, a 448x448 image + 100 text tokens each, response
         lengths drawn log-uniformly in [32, --rl-max-new-tokens] per prompt (its n samples share it; short
         answers common, long ones rare). Both sides produce exactly the drawn lengths: the engine through
         per-request max_new_tokens, HF generate through a logits processor that forces end-of-sequence at the
         drawn length and forbids it before. Timed three ways in one run: the engine (continuous batching),
         the engine with static batches (rollout.embedded.continuous_batching=false: a batch fills the
         empty cache and every step covers its full width until its longest response ends, as HF generate
         batches; the next is admitted only then), and HF.
Defaults: 256 requests x 256 prompt + 256 new tokens (issue 6's acceptance workload); rl 64 x 5 up to 2048.
The decode bandwidth floor: per step the weights plus every running sequence's cached keys/values are read
once, at the copy bandwidth measured in this run; `decode_floor_fraction` is the floor's decode time over
the engine's (the call minus its prefill, text and image only).
`--quick` runs a tiny model on the CPU in seconds (the smoke test runs it).

    python benchmarks/bench_rollout.py                 # on a GPU, text and image
    python benchmarks/bench_rollout.py --workload rl   # the RL-shaped workload
    python benchmarks/bench_rollout.py --quick         # CPU smoke run, all three
Prints one JSON line per workload and a markdown row for benchmarks/RESULTS.md.
"""
import argparse
import dataclasses
import datetime
import inspect
import json
import math
import os
import sys
import tempfile
import time
from typing import Dict, List, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/common.py (it adds the repository)

from common import profile_summary, significant  # noqa: E402
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
WORKLOADS = {"text": "3b", "image": "7b", "rl": "3b"}
RL_SAMPLES = 5
RL_PROMPT_TOKENS = 100
RL_MIN_NEW_TOKENS = 32
PROFILE_NEW_TOKENS = 16  # a profiled call's decode steps: enough to see a step, short enough to aggregate fast
PROFILE_DECODE_STEPS = 8
STEP_COST_WIDTHS = (1, 8, 32, 64, 128, 256)  # the batch buckets an RL-shaped call passes through
STEP_COST_LENGTHS = (8, 512, 2048)


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


class ForcedLengths:
    """HF logits processor: row r ends with end-of-sequence exactly at its lengths[r]-th new token."""

    def __init__(self, lengths: torch.Tensor, end_of_sequence: int, prompt_length: int) -> None:
        self.lengths, self.end_of_sequence, self.prompt_length = lengths, end_of_sequence, prompt_length

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        at_end = (self.lengths == input_ids.shape[1] - self.prompt_length + 1).unsqueeze(-1)
        forced = torch.full_like(scores, float("-inf"))
        forced[:, self.end_of_sequence] = 0.0
        scores = scores.clone()
        scores[:, self.end_of_sequence] = float("-inf")
        return torch.where(at_end, forced, scores)


def hf_generate_seconds(model, requests: List[RolloutRequest], new_tokens: int, device: torch.device,
                        samples: int = 1, lengths: Optional[List[int]] = None) -> float:
    """Wall time of one batched HF generate over all requests (left-padded): new_tokens forced, or with
    `lengths` (per request) each of its `samples` sequences ended by end-of-sequence at its length."""
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
    if lengths is None:
        stopping = dict(min_new_tokens=new_tokens)
    else:
        from transformers import LogitsProcessorList

        per_row = torch.tensor(lengths, device=device).repeat_interleave(samples)  # HF's row order
        eos = model.config.text_config.eos_token_id
        stopping = dict(eos_token_id=eos, logits_processor=LogitsProcessorList([ForcedLengths(per_row, eos, length)]))
    _synchronize(device)
    start = time.perf_counter()
    with torch.no_grad():
        model.generate(**inputs, do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=new_tokens,
                       num_return_sequences=samples, pad_token_id=0, **stopping)
    _synchronize(device)
    return time.perf_counter() - start


def benchmark_sampling(new_tokens: int, samples: int = 1) -> SamplingParams:
    """Plain temperature-1 sampling of exactly new_tokens per sample (RL's setting)."""
    return SamplingParams(n=samples, temperature=1.0, max_new_tokens=new_tokens, ignore_eos=True, seed=0)


def engine_generate_seconds(engine: EmbeddedEngine, requests: List[RolloutRequest], new_tokens: int,
                            device: torch.device, samples: int = 1) -> float:
    """Wall time of one engine call: every request's max_new_tokens (else new_tokens) per sample, exactly."""
    sampling = benchmark_sampling(new_tokens, samples)
    _synchronize(device)
    start = time.perf_counter()
    results = engine.generate(requests, sampling)
    _synchronize(device)
    seconds = time.perf_counter() - start
    produced = sum(len(result.response_ids) for result in results)
    expected = samples * sum(new_tokens if request.max_new_tokens is None else request.max_new_tokens
                             for request in requests)
    if produced != expected:
        raise RuntimeError(f"engine produced {produced} tokens, expected {expected}")
    return seconds


def copy_bandwidth(device: torch.device, size_bytes: int = 1 << 32, repeats: int = 10) -> float:
    """Bytes/s of a device-to-device copy (read + write counted), timed here: the decode floor's denominator."""
    source = torch.empty(size_bytes // 2, dtype=torch.bfloat16, device=device)
    target = torch.empty_like(source)
    target.copy_(source)
    _synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        target.copy_(source)
    _synchronize(device)
    return 2.0 * size_bytes * repeats / (time.perf_counter() - start)


def decode_floor_seconds(config, requests: int, prompt_tokens: int, new_tokens: int, bandwidth: float) -> float:
    """Seconds the decode steps need at `bandwidth` if each step reads the language model's weights once and
    every sequence's cached keys/values once (all requests decoding together, the forced-length workloads)."""
    text = config.text_config
    head_dim = text.hidden_size // text.num_attention_heads
    embedding = text.vocab_size * text.hidden_size
    layer = (text.hidden_size * head_dim * (text.num_attention_heads * 2 + text.num_key_value_heads * 2)
             + 3 * text.hidden_size * text.intermediate_size)
    weights = 2 * (text.num_hidden_layers * layer + embedding * (1 if text.tie_word_embeddings else 2))
    kv_per_token = 2 * 2 * text.num_hidden_layers * text.num_key_value_heads * head_dim
    steps = range(1, new_tokens)  # the prefill samples the first token
    cached = sum(requests * (prompt_tokens + step) for step in steps)
    return (len(steps) * weights + cached * kv_per_token) / bandwidth


def profile_engine(engine: EmbeddedEngine, requests: List[RolloutRequest], device: torch.device,
                   new_tokens: int = PROFILE_NEW_TOKENS) -> Dict[str, Dict]:
    """What a call's time is made of: one short generate call (prefill, decode steps, sampling), and the decode
    step alone, replayed from its graph and eager (a replay hides which operator launched a kernel), at the
    call's batch over its whole KV length. Reaches into the engine's cache and decode step: benchmark-only."""
    summaries = {"call": profile_summary(lambda: engine_generate_seconds(engine, requests, new_tokens, device), device)}
    cache = engine._cache
    batch, kv_len = len(requests), cache.geometry.max_len
    replayed = engine._decode_step(cache, benchmark_sampling(new_tokens))
    # every slot at the bucket's length and inactive (the call retired them), so each replay attends to the whole
    # KV length and repeats the same work; at length 0 the profile would leave out the attention
    cache.cache_lens[:batch] = kv_len - 1

    def eager(batch: int, kv_len: int):
        return engine.decoder.decode(cache, batch, kv_len)

    for name, decode in (("decode_step_graph", replayed), ("decode_step_eager", eager)):
        decode(batch, kv_len)  # captures the graph for this bucket
        summaries[name] = profile_summary(lambda: [decode(batch, kv_len) for _ in range(PROFILE_DECODE_STEPS)], device)
        summaries[name]["per_step_ms"] = round(1000 * summaries[name]["wall_s"] / PROFILE_DECODE_STEPS, 3)
    cache.cache_lens.zero_()
    return summaries


def decode_step_costs(engine: EmbeddedEngine, device: torch.device, widths=STEP_COST_WIDTHS,
                      cached_lengths=STEP_COST_LENGTHS, repeats: int = 10) -> Dict[str, float]:
    """Milliseconds per decode step (graph-replayed where the engine uses graphs) by batch width and cached
    length ("WIDTHxLENGTH"): what a step of a long-tailed call costs as its batch shrinks. Every slot of the
    step is set to that length and left inactive, so replays repeat the same work (inactive slots' lengths stay
    put). Reaches into the engine's cache and decode step: benchmark-only; call it after a generate call."""
    cache = engine._cache
    step = engine._decode_step(cache, benchmark_sampling(1))
    slots, max_len = cache.geometry.slots, cache.geometry.max_len
    costs = {}
    for length in (length for length in cached_lengths if length < max_len):
        for width in (width for width in widths if width <= slots):
            cache.cache_lens[:width] = length
            step(width, length + 1)  # captures the bucket's graph on first use
            _synchronize(device)
            start = time.perf_counter()
            for _ in range(repeats):
                step(width, length + 1)
            _synchronize(device)
            costs[f"{width}x{length}"] = round(1000 * (time.perf_counter() - start) / repeats, 3)
    cache.cache_lens.zero_()
    return costs


def admission_seconds(engine: EmbeddedEngine, requests: List[RolloutRequest], new_tokens: int, device: torch.device,
                      samples: int) -> Dict[str, float]:
    """One more engine call with its prompts' admissions timed (vision tower and prefill, synchronised around
    each): how many prefill calls the batching mode makes and what they cost in all. Wraps the engine's decoder
    in place for the call: benchmark-only."""
    decoder = engine.decoder
    spent = {"prefill_calls": 0, "admission_seconds": 0.0}

    def timed(method, counts: bool):
        def call(*args, **kwargs):
            _synchronize(device)
            start = time.perf_counter()
            result = method(*args, **kwargs)
            _synchronize(device)
            spent["admission_seconds"] += time.perf_counter() - start
            spent["prefill_calls"] += counts
            return result
        return call

    decoder.embed_prompts, decoder.prefill = timed(decoder.embed_prompts, False), timed(decoder.prefill, True)
    try:
        engine_generate_seconds(engine, requests, new_tokens, device, samples)
    finally:
        del decoder.embed_prompts, decoder.prefill  # the class's methods again
    spent["admission_seconds"] = round(spent["admission_seconds"], 3)
    return spent


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _models(name: str, args, device: torch.device, dtype: torch.dtype):
    """(config, HF model, engine with its weights) for workload `name`."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    config = build_config("tiny" if args.quick else WORKLOADS[name])
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation="sdpa").eval()
    with tempfile.TemporaryDirectory() as config_dir:
        config.save_pretrained(config_dir)
        engine = EmbeddedEngine(config_dir, device, dtype, max_batch_size=args.requests)
    engine.update_weights([list(model.named_parameters())])  # module names pass through unchanged
    return config, model, engine


def _header(name: str, args, device: torch.device, dtype: torch.dtype) -> Dict:
    return dict(workload=name, shape="tiny" if args.quick else WORKLOADS[name],
                device=str(torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"),
                dtype=str(dtype).replace("torch.", ""))


def run_workload(name: str, args, device: torch.device, dtype: torch.dtype) -> Dict:
    config, model, engine = _models(name, args, device, dtype)
    image_size = (56 if args.quick else args.image_size) if name == "image" else None
    requests = make_requests(config, args.requests, args.prompt_tokens, image_size)
    warmup = requests[:2]

    engine_generate_seconds(engine, requests, args.new_tokens, device)  # captures the decode graphs it will replay
    engine_seconds = engine_generate_seconds(engine, requests, args.new_tokens, device)
    prefill_seconds = engine_generate_seconds(engine, requests, 1, device)  # the prompts' share of the call
    new_tokens = args.requests * args.new_tokens
    prompt_tokens = len(requests[0].prompt_ids)
    floor = decode_floor_seconds(config, args.requests, prompt_tokens, args.new_tokens, copy_bandwidth(device))
    row = dict(_header(name, args, device, dtype), requests=args.requests, prompt_tokens=prompt_tokens,
               new_tokens=args.new_tokens, engine_seconds=round(engine_seconds, 3),
               engine_tokens_per_s=round(new_tokens / engine_seconds, 1), prefill_seconds=round(prefill_seconds, 3),
               decode_ms_per_step=round(1000 * (engine_seconds - prefill_seconds) / max(args.new_tokens - 1, 1), 3),
               decode_floor_fraction=significant(floor / max(engine_seconds - prefill_seconds, 1e-9), 3))
    if args.profile:
        row["profile"] = profile_engine(engine, requests, device)
    engine.shutdown()
    del engine
    if not args.skip_hf:
        hf_generate_seconds(model, warmup, 4, device)
        hf_seconds = hf_generate_seconds(model, requests, args.new_tokens, device)
        row.update(hf_seconds=round(hf_seconds, 3), hf_tokens_per_s=round(new_tokens / hf_seconds, 1),
                   speedup=round(hf_seconds / engine_seconds, 2))
    return row


def rl_lengths(prompts: int, longest: int, seed: int = 0) -> List[int]:
    """Response lengths per prompt, log-uniform in [RL_MIN_NEW_TOKENS, longest], seeded."""
    generator = torch.Generator().manual_seed(seed)
    low = math.log(min(RL_MIN_NEW_TOKENS, longest))
    draws = torch.exp(low + torch.rand(prompts, generator=generator, dtype=torch.float64) * (math.log(longest) - low))
    return [int(length) for length in draws.round().clamp(1, longest)]


def run_rl_workload(args, device: torch.device, dtype: torch.dtype) -> Dict:
    config, model, engine = _models("rl", args, device, dtype)
    prompts = 4 if args.quick else args.rl_prompts
    longest = 8 if args.quick else args.rl_max_new_tokens
    samples = 2 if args.quick else RL_SAMPLES
    lengths = rl_lengths(prompts, longest)
    requests = [dataclasses.replace(request, max_new_tokens=length) for request, length in
                zip(make_requests(config, prompts, 8 if args.quick else RL_PROMPT_TOKENS,
                                  56 if args.quick else args.image_size), lengths)]
    produced = samples * sum(lengths)
    row = dict(_header("rl", args, device, dtype), prompts=prompts, samples=samples,
               prompt_tokens=len(requests[0].prompt_ids), max_new_tokens=longest, mean_new_tokens=round(
                   sum(lengths) / prompts, 1), new_tokens=produced)
    for mode, continuous in (("engine", True), ("static", False)):
        engine.settings.continuous_batching = continuous
        # an RL run repeats one workload every step: the graphs its shapes need are captured by the first
        engine_generate_seconds(engine, requests, longest, device, samples)
        seconds = engine_generate_seconds(engine, requests, longest, device, samples)
        row.update({f"{mode}_seconds": round(seconds, 3), f"{mode}_tokens_per_s": round(produced / seconds, 1)})
        if args.profile:
            row[f"{mode}_admissions"] = admission_seconds(engine, requests, longest, device, samples)
    if args.profile:
        row["step_ms_by_width_x_length"] = decode_step_costs(engine, device)
    engine.shutdown()
    del engine
    row["speedup_over_static"] = round(row["static_seconds"] / row["engine_seconds"], 2)
    if not args.skip_hf:
        hf_generate_seconds(model, requests[:2], 4, device)
        hf_seconds = hf_generate_seconds(model, requests, longest, device, samples, lengths)
        row.update(hf_seconds=round(hf_seconds, 3), hf_tokens_per_s=round(produced / hf_seconds, 1),
                   speedup=round(hf_seconds / row["engine_seconds"], 2))
    return row


def parse_args(argv: Optional[List[str]]):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model on CPU, a few requests (smoke test)")
    parser.add_argument("--workload", choices=["text", "image", "rl", "both", "all"], default="both",
                        help="both: text and image; all: text, image and rl")
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--prompt-tokens", type=int, default=256, help="text tokens per prompt (image tokens extra)")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=448)
    parser.add_argument("--rl-prompts", type=int, default=64, help="rl workload: prompts (x 5 samples)")
    parser.add_argument("--rl-max-new-tokens", type=int, default=2048, help="rl workload: longest response")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default=None, help="default: bf16 on GPU, fp32 on CPU")
    parser.add_argument("--skip-hf", action="store_true", help="time only the engine")
    parser.add_argument("--profile", action="store_true",
                        help=f"also profile one engine call of {PROFILE_NEW_TOKENS} new tokens (graphs and eager); "
                             "rl: time the admissions and the decode steps by batch width and cached length")
    args = parser.parse_args(argv)
    if args.quick:
        args.requests, args.prompt_tokens, args.new_tokens = 4, 8, 8
        if args.workload == "both":
            args.workload = "all"
    return args


def main(argv: Optional[List[str]] = None) -> List[Dict]:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    names = {"both": ["text", "image"], "all": ["text", "image", "rl"]}.get(args.workload, [args.workload])
    rows = []
    for name in names:
        row = run_rl_workload(args, device, dtype) if name == "rl" else run_workload(name, args, device, dtype)
        rows.append(row)
        print(json.dumps(row), flush=True)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    command = f"`python benchmarks/bench_rollout.py {' '.join(argv if argv is not None else sys.argv[1:])}`"
    for row in rows:
        if row["workload"] == "rl":
            print(f"| {date} | {row['device']} | rl ({row['shape']}, {row['dtype']}) | {row['prompts']} x "
                  f"{row['samples']}, {row['prompt_tokens']}+{row['mean_new_tokens']} mean (max {row['max_new_tokens']})"
                  f" | {row.get('hf_tokens_per_s', '-')} | {row['engine_tokens_per_s']} (static "
                  f"{row['static_tokens_per_s']}, {row['speedup_over_static']}x) | {row.get('speedup', '-')}x | "
                  f"{command} |")
            continue
        print(f"| {date} | {row['device']} | {row['workload']} ({row['shape']}, {row['dtype']}) | "
              f"{row['requests']} x {row['prompt_tokens']}+{row['new_tokens']} | {row.get('hf_tokens_per_s', '-')} | "
              f"{row['engine_tokens_per_s']} (floor {row['decode_floor_fraction']:.0%} of decode) | "
              f"{row.get('speedup', '-')}x | {command} |")
    return rows


if __name__ == "__main__":
    main()

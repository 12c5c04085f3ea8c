"""Full GRPO steps at Geometry3K-like lengths through the real trainer (launch/train.py's code path).

    python benchmarks/bench_step.py                 # Qwen2.5-VL-3B shape (random weights), one GPU
    python benchmarks/bench_step.py --profile-pass  # then profile one scoring pass and one update micro-batch
    python benchmarks/bench_step.py --quick         # tiny model on the CPU, 2 steps (the smoke test runs it)

Workload per step (the per-GPU share of EasyR1's Geometry3K baseline, 512 prompts x n=5 on 8 GPUs):
64 prompts x n=5, each one 448x448 image (256 image tokens) plus about 150 text tokens, 512 sampled
response tokens (a random model almost never samples eos), the embedded engine colocated, a frozen
reference for the KL loss, 4 optimizer steps per rollout, update micro-batches of 8,192 tokens (scoring ones of
16,384), the activation recompute the memory planner chooses (model.recompute=auto). Every phase runs: generate, reward, old and
reference log-probs, update, weight sync. Prints per-step JSON (time per phase, tokens/s/GPU) and a
markdown row for benchmarks/RESULTS.md against the best published figure for this task (EasyR1 on
8xH100: 1,800 tokens/s/GPU for 3B), which cannot be run here; the steady-state figure leaves out step 1
(CUDA-graph capture and allocator warm-up).
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
from typing import Dict, List, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import command_line, device_name, markdown_row, profile_summary, utc_date  # noqa: E402

PUBLISHED_TOKENS_PER_S_PER_GPU = 1800.0  # EasyR1 assets/baselines.md, Qwen2.5-VL-3B, 8xH100
QUESTION = "Find the distance from O to chord AB. Think step by step, then put the final answer in \\boxed{}."
PHASES = ("time/generate_and_reward_s", "time/logprob_s", "time/update_s", "time/weight_sync_s", "time/step_s")
PHASE_MFU = ("throughput/mfu_logprob", "throughput/mfu_update")
# the engine's sampled log-probs against the actor's old ones (mean and max absolute difference per step)
ROLLOUT_FIDELITY = ("rollout/logprob_abs_diff", "rollout/logprob_abs_diff_max")


def write_prompts(path: str, count: int, image_size: int, seed: int = 0) -> None:
    """Geometry3K-shaped rows: one random image and a geometry question each, answer "4"."""
    import io

    from PIL import Image

    from mmrl_megatron.data.format import make_row, write_rows

    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(count):
        pixels = torch.randint(0, 256, (image_size, image_size, 3), generator=generator, dtype=torch.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels.numpy()).save(buffer, format="PNG")
        rows.append(make_row(QUESTION, [buffer.getvalue()], "4", "hiyouga/geometry3k"))
    write_rows(path, rows)


def step_overrides(args, work_dir: str, hf_dir: str, data_path: str) -> List[str]:
    pixels = args.image_size * args.image_size
    return [
        f"model.hf_path={hf_dir}", f"model.dtype={args.dtype}", f"model.recompute={args.recompute}",
        f"trainer.run_dir={work_dir}/run",
        f"trainer.steps={args.steps}", "trainer.resume=never", "trainer.save_every=-1", f"data.train_files=[{data_path}]",
        f"data.prompts_per_step={args.prompts}", f"data.min_pixels={pixels}", f"data.max_pixels={pixels}",
        "data.max_prompt_length=2048", f"rollout.n={args.n}", f"rollout.max_new_tokens={args.response_tokens}",
        f"rollout.max_batch_size={args.prompts * args.n}", "algorithm.kl_coef=0.001",
        f"actor.micro_batch_tokens={args.micro_batch_tokens}",
        f"actor.scoring_micro_batch_tokens={args.scoring_micro_batch_tokens}",
        f"actor.mini_batches_per_step={args.mini_batches}",
        "actor.optim.lr=1e-6", "logging.wandb=false", "logging.plot_at_end=false", "logging.console=true",
        "reward.num_workers=2",
    ]


def summarise(records: List[Dict], args, device: str) -> Dict:
    steady = records[1:] or records
    summary = {"device": device, "shape": args.shape, "dtype": args.dtype, "prompts": args.prompts, "n": args.n,
               "response_tokens": args.response_tokens, "steps": len(records),
               "step1_s": round(records[0]["time/step_s"], 4),
               "tokens_per_step": round(statistics.mean(r["tokens/step"] for r in steady)),
               "response_length_mean": round(statistics.mean(r["response/length_mean"] for r in steady), 1)}
    for phase in PHASES:  # to 0.1 ms: a tiny model's weight sync takes about 5 ms
        summary[phase.split("/")[1]] = round(statistics.mean(r[phase] for r in steady), 4)
    summary["tokens_per_s_per_gpu"] = round(statistics.mean(r["throughput/tokens_per_s_per_gpu"] for r in steady), 1)
    summary["vs_published"] = round(summary["tokens_per_s_per_gpu"] / PUBLISHED_TOKENS_PER_S_PER_GPU, 2)
    for key in ("throughput/mfu",) + PHASE_MFU:
        if key in steady[0]:
            summary[key.split("/")[1]] = round(statistics.mean(r[key] for r in steady), 4)
    return summary


def read_metrics(run_dir: str) -> List[Dict]:
    """The RL steps' metrics lines (step 0 holds the warm-up sync and evaluation, not a step)."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as handle:
        records = [json.loads(line) for line in handle]
    steps = [record for record in records if record["step"] > 0 and "time/step_s" in record]
    for record in steps:
        record["tokens/step"] = record["throughput/tokens_per_s_per_gpu"] * record["time/step_s"]
    return steps


def parse_args(argv: Optional[List[str]]):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model, CPU, 2 short steps (smoke test)")
    parser.add_argument("--shape", choices=["3b", "7b"], default="3b")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--n", type=int, default=5)
    parser.add_argument("--response-tokens", type=int, default=512)
    parser.add_argument("--image-size", type=int, default=448)
    parser.add_argument("--micro-batch-tokens", type=int, default=8192, help="the update's token budget")
    parser.add_argument("--scoring-micro-batch-tokens", type=int, default=16384,
                        help="the forward-only log-prob passes' token budget")
    parser.add_argument("--mini-batches", type=int, default=4, help="optimizer steps per rollout")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--recompute", choices=["none", "selective", "full", "auto"], default="auto",
                        help="activation recompute; auto: the memory planner's choice for this GPU")
    parser.add_argument("--work-dir", default=None, help="checkpoint, data and run directory (default: temporary)")
    parser.add_argument("--profile-pass", action="store_true",
                        help="after the steps, profile one actor scoring pass and one update micro-batch and print "
                             "kernels, host syncs, GPU-busy share and top kernels for each")
    args = parser.parse_args(argv)
    if args.quick:
        args.shape, args.steps, args.prompts, args.n, args.response_tokens = "tiny", 2, 2, 2, 4
        args.image_size, args.micro_batch_tokens, args.mini_batches, args.dtype = 56, 1024, 1, "float32"
        args.scoring_micro_batch_tokens = 1024
    return args


def profile_one_pass(trainer) -> Dict[str, Dict]:
    """One actor scoring pass over a fresh step's micro-batches, and one update micro-batch, each profiled
    alone (profiling whole steps takes minutes to aggregate)."""
    from mmrl_megatron.trainer import losses
    from mmrl_megatron.trainer.batch import build_micro_batches

    config, actor = trainer.config, trainer.parts.actor
    temperature, tensor_group = config.rollout.temperature or 1.0, trainer.parts.dims.tensor_group
    samples, _ = trainer.generate_and_reward(config.trainer.steps + 1)
    micro_batches = build_micro_batches(samples, config.actor.scoring_micro_batch_tokens
                                        or config.actor.micro_batch_tokens, trainer.parts.pack_sequences)
    scoring = profile_summary(lambda: actor.score(
        micro_batches, lambda output, mb: losses.response_logprobs(output, mb, temperature, tensor_group),
        "old_logprobs"),
        trainer.parts.device)
    scoring["tokens"] = sum(mb.num_tokens for mb in micro_batches)
    trainer.score_with_models(micro_batches, on_policy=False)
    trainer.compute_advantages(samples)
    [first, *_] = build_micro_batches(samples, config.actor.micro_batch_tokens, trainer.parts.pack_sequences)
    normaliser = trainer.normaliser(first.samples)
    update = profile_summary(lambda: actor.train_step(
        [first],
        lambda output, mb: losses.actor_loss(output, mb, trainer.algorithm, temperature, normaliser, tensor_group),
        config.actor.optim.grad_clip), trainer.parts.device)
    update["tokens"] = first.num_tokens
    return {"scoring_pass": scoring, "update_micro_batch": update}


def run_steps(args, overrides: List[str]) -> Dict[str, object]:
    """launch/train.py's run on this process (trainer/run.py's order): the GPU's peak memory over the steps,
    and with --profile-pass the pass profile after them."""
    from mmrl_megatron.config import load_config
    from mmrl_megatron.parallel import detect_process_place, pick_device, shutdown, start_processes
    from mmrl_megatron.trainer.build import build_trainer, close_trainer
    from mmrl_megatron.trainer.run import check_before_start

    config = load_config(None, overrides)
    dims = check_before_start(config, detect_process_place().world_size, None)
    device = pick_device(config.trainer.device)
    start_processes(dims, device)
    try:
        trainer = build_trainer(config, dims, device)
        try:
            trainer.run()
            measured: Dict[str, object] = {"recompute": config.model.recompute}  # auto resolved by the build
            if device.type == "cuda":
                measured["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 1)
                measured["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved(device) / 2 ** 30, 1)
            if args.profile_pass:
                measured["profile"] = profile_one_pass(trainer)
            return measured
        finally:
            close_trainer(trainer)
    finally:
        shutdown()


def main(argv: Optional[List[str]] = None) -> Dict:
    from bench_convert import write_random_checkpoint

    args = parse_args(argv)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29541")
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    with tempfile.TemporaryDirectory(dir=args.work_dir) as work_dir:
        hf_dir, data_path = os.path.join(work_dir, "model"), os.path.join(work_dir, "train.parquet")
        write_random_checkpoint(hf_dir, args.shape, getattr(torch, args.dtype))
        write_prompts(data_path, args.prompts * 3, args.image_size)
        overrides = step_overrides(args, work_dir, hf_dir, data_path) + (["trainer.device=cpu"] if args.quick else [])
        measured = run_steps(args, overrides)
        records = read_metrics(os.path.join(work_dir, "run"))
    summary = summarise(records, args, device_name(torch.device("cuda")) if torch.cuda.is_available()
                        and not args.quick else "cpu")
    for record in records:
        print(json.dumps({key: record[key] for key in ("step",) + PHASES + ("throughput/tokens_per_s_per_gpu",)
                          + PHASE_MFU + ROLLOUT_FIDELITY if key in record}))
    summary.update(measured)
    print(json.dumps(summary))
    print(markdown_row([utc_date(), summary["device"], f"GRPO step {summary['shape']} {summary['dtype']}, "
                        f"{summary['prompts']} prompts x n={summary['n']}, {summary['response_tokens']} new tokens",
                        f"{summary['tokens_per_s_per_gpu']} tokens/s/GPU ({summary['step_s']} s/step: generate+reward "
                        f"{summary['generate_and_reward_s']}, log-probs {summary['logprob_s']}, update "
                        f"{summary['update_s']}, sync {summary['weight_sync_s']})",
                        f"EasyR1 published {PUBLISHED_TOKENS_PER_S_PER_GPU:.0f}", f"{summary['vs_published']}x",
                        f"`{command_line('bench_step.py', argv)}`"]))
    return summary


if __name__ == "__main__":  # dist_checkpointing starts helper processes that re-import this file
    main()

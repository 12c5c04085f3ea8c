"""Actor-update throughput: this project's megatron-core Qwen2.5-VL language model against Hugging Face's
Qwen2ForCausalLM (attn_implementation="sdpa") on the same sequences and the same weights, one GPU.

A step is one optimizer update over a mini-batch of prompt + response sequences (a quarter prompt),
with the PPO-clip policy loss over the response tokens (trainer/losses.py actor_loss, the same function
on both sides; its log-probs never materialise fp32 full-vocabulary logits). Workloads:
  fixed     8 sequences x 2048 tokens; micro-batches of 2 x 2048 on both sides
  variable  RL-like lengths: 128..2048 tokens, log-uniform (short answers common, long ones rare), seeded,
            about the same total. Ours packs them without padding (THD) into micro-batches of at most
            2 x 2048 tokens (the trainer's split_by_token_budget); HF takes them 2 at a time padded to the
            longer, as HF users train (a fixed batch size chosen for the longest case)
Ours is the trainer's actor update: trainer/build.py build_role (megatron-core DDP with fp32 gradient
buffers, megatron-core's optimizer with fp32 main weights, which without apex/TE steps torch's fused AdamW)
and ModelRole.train_step (megatron-core's schedule). With --cuda-graphs (a GPU) the fixed workload runs
with actor.cuda_graphs, as a fixed-length training run can: its micro-batches repeat their shapes, so they
replay as CUDA graphs (trainer/update_graphs.py). The variable workload always runs eagerly: it stands for
RL rollouts, whose lengths do not repeat between steps. HF: bf16 weights and torch fused AdamW,
clip_grad_norm_, use_cache=False. Both: lr 1e-6, weight decay 0.01, gradient clip 1.0, no recompute, no
Transformer Engine, bf16 on a GPU (fp32 on the CPU). Our model's vision tower is shrunk to one tiny
frozen block (the workload is text; the actor class always carries a tower).

Figures per side: tokens/s (real tokens; HF's padding is not counted), MFU = (6N + 12*L*H*S) * tokens /
time / peak, summed per sequence (6N*T + 12*L*H*sum(S_i^2)), with N the HF model's parameters (tied
embedding once) and the peak an 8192^3 bf16 matmul timed in this run (gpu_anchors.md's formula); peak
memory (CUDA allocator, above what was in use before the side was built); seconds per step in the
forward (loss included), backward and optimizer phases (device timeline). Targets (issue 15): ours >= 1.3x
HF on fixed, >= 2.0x on variable. Ours projects only the response positions onto the vocabulary (the trainer's
micro-batches carry output rows); HF computes logits at every position, as HF training does.

    python benchmarks/bench_train.py                          # Qwen2.5-VL-3B language model, one GPU
    python benchmarks/bench_train.py --quick                  # tiny model on the CPU (the smoke test runs it)
    python benchmarks/bench_train.py --quick --device cuda    # the same tiny run on a GPU, seconds

Prints one JSON line per workload and a markdown row each for benchmarks/RESULTS.md.
"""
import argparse
import gc
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch

from common import (GIB, PeakMemory, PhaseClock, allocated_bytes, command_line, device_name,
                    init_single_process_megatron, markdown_row, matmul_peak_flops, pick_device, profile_call,
                    print_rows, profile_summary, synchronize, utc_date)

from bench_rollout import build_config  # the published geometries, kept in one place

LEARNING_RATE = 1e-6
WEIGHT_DECAY = 0.01
GRAD_CLIP = 1.0
TARGET_SPEEDUP = {"fixed": 1.3, "variable": 2.0}  # issue 15
# the actor class always builds a vision tower; for a text workload a single 32-wide block stands in for it
TINY_VISION = dict(depth=1, hidden_size=32, intermediate_size=32, num_heads=2, fullatt_block_indexes=[0])


@dataclass
class Workload:
    name: str
    lengths: List[int]  # tokens per sequence, in mini-batch order
    token_budget: int  # our packed micro-batch limit
    hf_batch_size: int  # sequences per HF micro-batch


def fixed_lengths(sequences: int, length: int) -> List[int]:
    return [length] * sequences


def variable_lengths(total_tokens: int, shortest: int, longest: int, seed: int = 0) -> List[int]:
    """Log-uniform lengths in [shortest, longest] drawn until they sum to at least total_tokens."""
    generator = torch.Generator().manual_seed(seed)
    lengths: List[int] = []
    while sum(lengths) < total_tokens:
        exponent = float(torch.rand((), generator=generator))
        lengths.append(int(round(shortest * (longest / shortest) ** exponent)))
    return lengths


def model_configs(shape: str):
    """(Qwen2.5-VL config dict for our builder, the matching transformers Qwen2Config, the text geometry)."""
    from transformers import Qwen2Config

    from mmrl_megatron.models.qwen2_5_vl.hf_config import read_shape

    config = build_config(shape).to_dict()
    config["vision_config"].update(TINY_VISION)
    text = read_shape(config).text
    hf_config = Qwen2Config(
        vocab_size=text.vocab_size, hidden_size=text.hidden_size, intermediate_size=text.intermediate_size,
        num_hidden_layers=text.num_layers, num_attention_heads=text.num_heads,
        num_key_value_heads=text.num_kv_heads, max_position_embeddings=text.max_position_embeddings,
        rms_norm_eps=text.rms_norm_eps, tie_word_embeddings=text.tie_word_embeddings,
        # text-only M-RoPE positions are equal on its three axes, which is plain RoPE at the same theta
        rope_parameters={"rope_type": "default", "rope_theta": text.rope_theta})
    return config, hf_config, text


def hf_parameter_count(hf_config) -> int:
    """N of the MFU formula: the HF model's parameters, a tied embedding counted once."""
    from transformers import Qwen2ForCausalLM

    with torch.device("meta"):
        model = Qwen2ForCausalLM(hf_config)
    return sum(parameter.numel() for parameter in model.parameters())


def make_samples(lengths: List[int], vocab_size: int, token_limit: int, seed: int = 0):
    """trainer.batch Samples (a quarter prompt, the rest response) with what actor_loss reads: old
    log-probs of a uniform policy, so the ratio starts near 1, and one GRPO-like advantage per sequence."""
    from mmrl_megatron.trainer.batch import Sample

    generator = torch.Generator().manual_seed(seed)
    samples = []
    for index, length in enumerate(lengths):
        ids = torch.randint(0, token_limit, (length,), generator=generator).tolist()
        prompt = max(1, length // 4)
        response = length - prompt
        sample = Sample(ids[:prompt], ids[prompt:], group=index,
                        position_ids=torch.arange(length).expand(3, length))  # text: one position on all axes
        sample.tensors["old_logprobs"] = torch.full((response,), -math.log(vocab_size))
        sample.tensors["advantages"] = torch.full((response,), float(torch.randn((), generator=generator)))
        samples.append(sample)
    return samples


def padded_micro_batch(samples):
    """(MicroBatch over a right-padded [B, S] batch, attention_mask [B, S]): what HF trains on. HF's model
    returns logits at every position, so labels are [B, S] and the response index points into the flattened
    [B * S] stream (output_rows None); actor_loss reads either layout."""
    from mmrl_megatron.trainer.batch import MicroBatch, response_mask

    width = max(sample.length for sample in samples)
    input_ids = torch.zeros(len(samples), width, dtype=torch.long)
    labels = torch.zeros_like(input_ids)
    attention_mask = torch.zeros_like(input_ids)
    response_index = torch.zeros(len(samples), max(len(s.response_ids) for s in samples), dtype=torch.long)
    for row, sample in enumerate(samples):
        ids = torch.tensor(sample.prompt_ids + sample.response_ids)
        input_ids[row, :len(ids)] = ids
        labels[row, :len(ids) - 1] = ids[1:]
        attention_mask[row, :len(ids)] = 1
        first = row * width + len(sample.prompt_ids) - 1
        response_index[row, :len(sample.response_ids)] = torch.arange(first, first + len(sample.response_ids))
    batch = MicroBatch(samples, input_ids, labels, position_ids=None, packed_seq_params=None, pixel_values=None,
                       image_grid_thw=None, response_index=response_index, mask=response_mask(samples),
                       prompt_mask=None)
    return batch, attention_mask


def marked_actor_loss(samples, clock: PhaseClock, tensor_group):
    """actor_loss for this mini-batch (normalised over its response tokens); it opens the backward phase."""
    from mmrl_megatron.config.schema import AlgorithmConfig
    from mmrl_megatron.trainer.losses import Normaliser, actor_loss

    algorithm = AlgorithmConfig()
    normaliser = Normaliser(tokens=float(sum(len(s.response_ids) for s in samples)), sequences=float(len(samples)))

    def loss_fn(logits, micro_batch):
        result = actor_loss(logits, micro_batch, algorithm, 1.0, normaliser, tensor_group)
        clock.mark("backward")
        return result

    return loss_fn


def measure_steps(step: Callable[[], float], clock: PhaseClock, device: torch.device, args, baseline_bytes: int,
                  name: str) -> Dict:
    """Seconds per step, per phase, and peak memory over args.repeats steps after args.warmup (the optimizer
    state exists by then); `step` returns the mini-batch's mean policy loss, reported for the first step.
    With args.profile_dir one more step runs under torch.profiler: its trace is <name>.json.gz there and
    its operator table is appended to profile.txt."""
    def marked_step() -> float:
        clock.mark("other")  # zeroing gradients, moving batches: whatever precedes the first forward
        loss = step()
        clock.stop()
        return loss

    first_loss = marked_step()
    for _ in range(args.warmup - 1):
        marked_step()
    synchronize(device)
    clock.reset()
    with PeakMemory(device) as memory:
        start = time.perf_counter()
        for _ in range(args.repeats):
            marked_step()
        synchronize(device)
        seconds = (time.perf_counter() - start) / args.repeats
    phases = {f"{phase}_s": total / args.repeats for phase, total in clock.seconds_per_phase().items()}
    figures = dict(step_s=seconds, peak_gib=max(memory.peak_bytes - baseline_bytes, 0) / GIB, first_loss=first_loss,
                   **phases)
    print(f"bench_train: {name}: {json.dumps(figures)}", file=sys.stderr, flush=True)  # kept if a later part fails
    if args.profile_dir:
        profile_one_step(marked_step, device, args.profile_dir, name)
    return figures


def profile_one_step(step: Callable[[], float], device: torch.device, profile_dir: str, name: str) -> None:
    """<name>.json.gz (Chrome trace), and appended to profile.txt: <name>'s operator table and its
    profile_summary (kernels, host synchronisations, GPU-busy share, the longest GPU idle stretches with what
    the host did in them). A profiler failure is reported there and on stderr but does not cost the run its
    measurements."""
    os.makedirs(profile_dir, exist_ok=True)
    try:
        table = profile_call(step, device, os.path.join(profile_dir, f"{name}.json.gz"))
        table += "\n" + json.dumps(profile_summary(step, device))
    except Exception as error:  # noqa: BLE001  (the timings already taken matter more than the profile)
        table = f"profiling failed: {error!r}"
        print(f"bench_train: {name}: {table}", file=sys.stderr)
    with open(os.path.join(profile_dir, "profile.txt"), "a") as tables:
        tables.write(f"== {name}: one step, operators by their own time\n{table}\n")


# -- ours: the trainer's actor update ----------------------------------------------------------------------
def build_our_actor(config: dict, dtype: str, device: torch.device, dims, cuda_graphs: bool = False):
    """(ModelRole as the trainer builds the actor, with actor.cuda_graphs as given; its weights under HF
    names on the CPU)."""
    from mmrl_megatron.config.schema import Config, ModelConfig, OptimizerConfig
    from mmrl_megatron.convert import iter_hf_tensors
    from mmrl_megatron.models import build_model
    from mmrl_megatron.trainer.build import build_role

    model_config = ModelConfig(dtype=dtype, attention_backend="sdpa", freeze_vision_tower=True, freeze_merger=True)
    model = build_model(model_config, config, dims, "actor").to(device)
    # copies: on the CPU .cpu() would alias the parameters, which our optimizer then updates in place
    weights = {name: tensor.detach().to("cpu", copy=True) for name, tensor in iter_hf_tensors(model, dims)
               if not name.startswith("visual.")}
    run_config = Config(model=model_config)
    run_config.actor.optim = OptimizerConfig(lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY, grad_clip=GRAD_CLIP)
    role = build_role("actor", model, run_config, device, dims, run_config.actor.optim, cuda_graphs=cuda_graphs)
    return role, weights


def mark_our_phases(role, clock: PhaseClock) -> None:
    """Open the forward phase at every model call and the optimizer phase once megatron-core's schedule has
    finalised the gradients (its finalize_model_grads_func hook)."""
    from megatron.core.utils import get_model_config

    role.chunks[0].module.register_forward_pre_hook(lambda module, inputs: clock.mark("forward"))
    transformer_config = get_model_config(role.chunks[0])
    finalize = transformer_config.finalize_model_grads_func

    def finalize_then_mark(*args, **kwargs):
        result = finalize(*args, **kwargs)
        clock.mark("optimizer")
        return result

    transformer_config.finalize_model_grads_func = finalize_then_mark


def time_ours(config: dict, dtype: str, workloads: List[Workload], vocab_size: int, token_limit: int,
              device: torch.device, dims, args) -> Tuple[Dict[str, Dict], Dict[str, torch.Tensor]]:
    """Per-workload figures of our actor update, and the initial weights (HF names) for the HF side."""
    from mmrl_megatron.models.common.packing import pack_sequences
    from mmrl_megatron.trainer.batch import build_micro_batches

    baseline = allocated_bytes(device)
    cuda_graphs = args.cuda_graphs and device.type == "cuda"
    role, weights = build_our_actor(config, dtype, device, dims, cuda_graphs)

    def graph_replays() -> int:
        return role.graphs.replays if cuda_graphs else 0

    clock = PhaseClock(device)
    mark_our_phases(role, clock)
    results = {}
    for workload in workloads:
        samples = make_samples(workload.lengths, vocab_size, token_limit)
        micro_batches = build_micro_batches(samples, workload.token_budget, pack_sequences)
        loss_fn = marked_actor_loss(samples, clock, dims.tensor_group)
        # the fixed workload's shapes repeat, as fixed-length training's do; the variable one stands for RL
        # rollouts, whose lengths do not repeat from step to step, so it runs eagerly
        loss_key = workload.name if cuda_graphs and workload.name == "fixed" else None
        replays_before = graph_replays()

        def step() -> float:
            stats, _, stepped = role.train_step(micro_batches, loss_fn, GRAD_CLIP, loss_key=loss_key)
            if not stepped:
                raise RuntimeError(f"{workload.name}: our update was skipped (non-finite loss or gradient norm)")
            total, count = stats["loss/policy"]
            return total / count

        results[workload.name] = dict(measure_steps(step, clock, device, args, baseline, f"ours_{workload.name}"),
                                      micro_batches=len(micro_batches),
                                      tokens_per_step=sum(mb.num_tokens for mb in micro_batches),
                                      graph_replays=graph_replays() - replays_before)
    return results, weights


# -- Hugging Face: the usual training loop -----------------------------------------------------------------
def build_hf_model(hf_config, weights: Dict[str, torch.Tensor], dtype: torch.dtype, device: torch.device):
    """Qwen2ForCausalLM (sdpa) holding `weights` (HF names); only a tied lm_head may be absent from them."""
    from transformers import Qwen2ForCausalLM

    with torch.device(device):
        model = Qwen2ForCausalLM._from_config(hf_config, dtype=dtype, attn_implementation="sdpa")
    missing, unexpected = model.load_state_dict(weights, strict=False)
    allowed_missing = {"lm_head.weight"} if hf_config.tie_word_embeddings else set()
    if unexpected or set(missing) - allowed_missing:
        raise RuntimeError(f"HF model and exported weights differ: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.train()


def hf_update_step(model, optimizer, batches, loss_fn, clock: PhaseClock) -> float:
    """Forward + backward per padded micro-batch, then clip and step; the mean policy loss."""
    total, count = 0.0, 0.0
    for micro_batch, attention_mask in batches:
        clock.mark("forward")
        logits = model(input_ids=micro_batch.input_ids, attention_mask=attention_mask, use_cache=False).logits
        loss, stats = loss_fn(logits, micro_batch)
        loss.backward()
        total, count = total + stats["loss/policy"][0], count + stats["loss/policy"][1]
    clock.mark("optimizer")
    torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(total / count)  # the statistics are device tensors: one read per step, as on our side


def time_hf(hf_config, weights, dtype: torch.dtype, workloads: List[Workload], vocab_size: int, token_limit: int,
            device: torch.device, args) -> Dict[str, Dict]:
    baseline = allocated_bytes(device)
    model = build_hf_model(hf_config, weights, dtype, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY, fused=True)
    clock = PhaseClock(device)
    results = {}
    for workload in workloads:
        samples = make_samples(workload.lengths, vocab_size, token_limit)
        groups = [samples[i:i + workload.hf_batch_size] for i in range(0, len(samples), workload.hf_batch_size)]
        batches = []
        for group in groups:
            micro_batch, attention_mask = padded_micro_batch(group)
            batches.append((micro_batch.to(device), attention_mask.to(device)))
        loss_fn = marked_actor_loss(samples, clock, None)  # HF's logits hold the whole vocabulary
        results[workload.name] = dict(
            measure_steps(lambda: hf_update_step(model, optimizer, batches, loss_fn, clock), clock, device, args,
                          baseline, f"hf_{workload.name}"),
            micro_batches=len(batches), tokens_per_step=sum(mb.input_ids.numel() for mb, _ in batches))
    return results


# -- figures ----------------------------------------------------------------------------------------------
def model_flops_per_step(lengths: List[int], parameters: int, text) -> float:
    """(6N + 12*L*H*S) per token summed over the sequences: 6N*T + 12*L*H*sum(S_i^2)."""
    return 6.0 * parameters * sum(lengths) + 12.0 * text.num_layers * text.hidden_size * sum(s * s for s in lengths)


def workload_row(workload: Workload, ours: Dict, hf: Dict, flops: float, peak_flops: float, common: Dict) -> Dict:
    tokens = sum(workload.lengths)
    row = dict(workload=workload.name, **common, sequences=len(workload.lengths), tokens_per_step=tokens,
               matmul_peak_tflops=float(f"{peak_flops / 1e12:.4g}"), target_speedup=TARGET_SPEEDUP[workload.name])
    for side, figures in (("ours", ours), ("hf", hf)):
        row[f"{side}_tokens_per_s"] = round(tokens / figures["step_s"], 1)
        row[f"{side}_mfu"] = round(flops / figures["step_s"] / peak_flops, 4)
        row[f"{side}_micro_batches"] = figures["micro_batches"]
        row[f"{side}_computed_tokens_per_step"] = figures["tokens_per_step"]
        row[f"{side}_first_loss"] = figures["first_loss"]
        for key in ("step_s", "peak_gib", "forward_s", "backward_s", "optimizer_s", "other_s"):
            row[f"{side}_{key}"] = round(figures.get(key, 0.0), 4)
    row["ours_graph_replays"] = ours["graph_replays"]
    row["speedup"] = round(row["ours_tokens_per_s"] / row["hf_tokens_per_s"], 3)
    return row


def results_row(row: Dict, argv: Optional[List[str]]) -> str:
    def figures(side: str) -> str:
        return (f"{row[f'{side}_tokens_per_s']} tok/s, MFU {100 * row[f'{side}_mfu']:.1f}%, "
                f"{row[f'{side}_peak_gib']:.1f} GiB (fwd/bwd/opt/other {row[f'{side}_forward_s']:.3f}/"
                f"{row[f'{side}_backward_s']:.3f}/{row[f'{side}_optimizer_s']:.3f}/{row[f'{side}_other_s']:.3f} s)")

    graphs = f" (CUDA graphs, {row['ours_graph_replays']} micro-batch replays)" if row["ours_graph_replays"] else ""

    return markdown_row([
        utc_date(), row["device"],
        f"actor update {row['workload']} ({row['shape']}, {row['dtype']}, {row['tokens_per_step']} tokens/step, "
        f"peak {row['matmul_peak_tflops']} TFLOP/s)",
        f"ours{graphs}: {figures('ours')}", f"HF sdpa: {figures('hf')}",
        f"{row['speedup']}x (target {row['target_speedup']}x)", f"`{command_line('bench_train.py', argv)}`"])


def parse_args(argv: Optional[List[str]]):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model, CPU unless --device cuda (smoke test)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--workload", choices=["fixed", "variable", "both"], default="both")
    parser.add_argument("--max-length", type=int, default=2048, help="fixed sequence length, variable maximum")
    parser.add_argument("--min-length", type=int, default=128, help="variable minimum")
    parser.add_argument("--sequences", type=int, default=8, help="fixed sequences per step (2 per micro-batch)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per side and workload (>= 1)")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per side and workload")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default=None,
                        help="default: bf16 on a GPU, fp32 on the CPU")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="our fixed workload with actor.cuda_graphs (on a GPU): its micro-batches replay as "
                             "CUDA graphs, forward and backward then count as one phase, other_s")
    parser.add_argument("--profile-dir", default=None,
                        help="also profile one step per side and workload: Chrome traces <side>_<workload>.json.gz "
                             "and the operator tables (by own device time) in profile.txt, here")
    args = parser.parse_args(argv)
    if args.quick:
        args.max_length, args.min_length, args.sequences = 64, 8, 4
        args.warmup, args.repeats = 1, 1
    if args.warmup < 1:
        parser.error("--warmup must be at least 1 (the first step creates the optimizer state)")
    return args


def build_workloads(args) -> List[Workload]:
    budget = 2 * args.max_length
    fixed = Workload("fixed", fixed_lengths(args.sequences, args.max_length), budget, 2)
    variable = Workload("variable", variable_lengths(sum(fixed.lengths), args.min_length, args.max_length), budget, 2)
    return [w for w in (fixed, variable) if args.workload in (w.name, "both")]


def run(args, device: torch.device, dims) -> List[Dict]:
    """One JSON-ready row per workload: both sides measured on the same sequences from the same weights."""
    dtype_name = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    dtype = getattr(torch, dtype_name)
    peak_flops = (matmul_peak_flops(device, torch.bfloat16) if device.type == "cuda"
                  else matmul_peak_flops(device, dtype, size=256, repeats=10))
    shape = "tiny" if args.quick else "3b"  # 7B at ~18 bytes per parameter (fp32 grads, main weights, Adam) won't fit
    config, hf_config, text = model_configs(shape)
    # random ids stay clear of the special tokens (an <|image_pad|> would ask for pixels)
    token_limit = min(text.vocab_size, config["image_token_id"], config["vision_start_token_id"]) - 16
    parameters = hf_parameter_count(hf_config)
    workloads = build_workloads(args)
    ours, weights = time_ours(config, dtype_name, workloads, text.vocab_size, token_limit, device, dims, args)
    gc.collect()  # our model, gradients and optimizer state go before the HF model is built
    if device.type == "cuda":
        torch.cuda.empty_cache()
    hf = time_hf(hf_config, weights, dtype, workloads, text.vocab_size, token_limit, device, args)
    common = dict(shape=shape, device=device_name(device), dtype=dtype_name, parameters=parameters)
    return [workload_row(workload, ours[workload.name], hf[workload.name],
                         model_flops_per_step(workload.lengths, parameters, text), peak_flops, common)
            for workload in workloads]


def main(argv: Optional[List[str]] = None) -> List[Dict]:
    from mmrl_megatron.parallel import shutdown

    args = parse_args(argv)
    device = pick_device(args.device, args.quick)
    dims = init_single_process_megatron(device)
    try:
        rows = run(args, device, dims)
    finally:
        shutdown()
    print_rows(rows, results_row, argv)
    return rows


if __name__ == "__main__":
    main()

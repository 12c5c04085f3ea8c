"""Step metrics in one place: combining (sum, count) statistics across ranks, rollout statistics,
throughput (tokens/s/GPU) and model FLOPs utilisation (MFU)."""
import math
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from .batch import Sample

Stats = Dict[str, Tuple[float, float]]

# Dense bf16 peak FLOP/s per GPU, by substring of the device name.
PEAK_FLOPS = (("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L40S", 362e12))


def add_stats(into: Stats, more: Stats) -> Stats:
    for key, (value, count) in more.items():
        total, weight = into.get(key, (0.0, 0.0))
        into[key] = (total + value, weight + count)
    return into


def reduce_across_ranks(stats: Stats, maxima: Dict[str, float]) -> Dict[str, float]:
    """Means of (sum, count) statistics and maxima over every rank; same result on all ranks."""
    gathered: List = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (stats, maxima))
    total: Stats = {}
    peak: Dict[str, float] = {}
    for rank_stats, rank_maxima in gathered:
        add_stats(total, rank_stats)
        for key, value in rank_maxima.items():
            peak[key] = max(peak.get(key, -math.inf), value)
    means = {key: value / count for key, (value, count) in total.items() if count > 0}
    return {**means, **peak}


def summed_counters(counters: Dict[str, float], group=None, largest: Tuple[str, ...] = ("data/epoch",)) -> Dict[str, float]:
    """Counters added up over the ranks of `group` (all ranks when None), the keys in `largest` maximised:
    each rank counts only the rows it read and the responses it scored."""
    gathered: List = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, counters, group=group)
    total: Dict[str, float] = {}
    for rank_counters in gathered:
        for key, value in rank_counters.items():
            total[key] = max(total.get(key, value), value) if key in largest else total.get(key, 0.0) + value
    return total


def _generated(sample: Sample, values: torch.Tensor) -> torch.Tensor:
    """The entries of a response-aligned tensor at tokens the policy generated (environment turns have no
    engine log-probs)."""
    return values if sample.loss_mask is None else values[torch.tensor(sample.loss_mask, dtype=torch.bool)]


def rollout_stats(samples: List[Sample], all_scores: List[float], max_new_tokens: int) -> Tuple[Stats, Dict[str, float]]:
    """Reward, accuracy, response length and clip ratio, and rollout-vs-trainer log-prob difference."""
    lengths = [len(s.response_ids) for s in samples]
    count = float(len(samples))
    stats: Stats = {
        "reward/mean": (sum(all_scores), float(len(all_scores))),
        "reward/sq": (sum(x * x for x in all_scores), float(len(all_scores))),
        "reward/accuracy": (sum(s.accuracy for s in samples), count),
        "response/length_mean": (float(sum(lengths)), count),
        # a multi-turn response is longer than one turn's max_new_tokens: its finish reason alone tells
        "response/clip_ratio": (float(sum(s.finish_reason == "length" or (s.loss_mask is None and n >= max_new_tokens)
                                          for s, n in zip(samples, lengths))), count),
    }
    if any(s.loss_mask is not None for s in samples):
        stats["rollout/assistant_turns_mean"] = (float(sum(s.assistant_turns for s in samples)), count)
        stats["rollout/environment_tokens_mean"] = (float(sum(n - s.trained_tokens for s, n in zip(samples, lengths))),
                                                    count)
    diffs = [_generated(s, (torch.tensor(s.rollout_logprobs) - s.tensors["old_logprobs"]).abs())
             for s in samples if s.rollout_logprobs and "old_logprobs" in s.tensors]
    if diffs:
        flat = torch.cat(diffs)
        stats["rollout/logprob_abs_diff"] = (float(flat.sum()), float(flat.numel()))
    maxima = {"response/length_max": float(max(lengths, default=0))}
    if diffs:
        maxima["rollout/logprob_abs_diff_max"] = float(flat.max())
    return stats, maxima


def finish_reward_std(metrics: Dict[str, float]) -> None:
    """Turn the mean of squares into the population std of the rewards (reward/std)."""
    square_mean = metrics.pop("reward/sq", None)
    if square_mean is not None and "reward/mean" in metrics:
        metrics["reward/std"] = math.sqrt(max(square_mean - metrics["reward/mean"] ** 2, 0.0))


def peak_flops_per_device(device: torch.device) -> Optional[float]:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_FLOPS if key in name), None)


def throughput_metrics(step_tokens: float, forward_passes: float, train_passes: float, generated_tokens: float,
                       parameter_count: float, seconds: Dict[str, float], world_size: int,
                       device: torch.device) -> Dict[str, float]:
    """tokens/s/GPU over the whole step and MFU from 2N FLOPs per token per forward and 6N per trained token
    (activation recompute not counted, as Megatron and verl count), for the step and for its scoring and
    update phases.

    step_tokens: prompt + response tokens of the global batch; forward_passes: scoring passes over them
    (old, reference, critic); train_passes: update passes (epochs x roles); generated_tokens: decoded tokens;
    seconds: the loop's times ("time/step_s", "time/logprob_s", "time/update_s")."""
    step_seconds = max(seconds["time/step_s"], 1e-9)
    metrics = {"throughput/tokens_per_s_per_gpu": step_tokens / step_seconds / world_size}
    peak = peak_flops_per_device(device)
    if not peak:
        return metrics
    scoring = 2 * parameter_count * step_tokens * forward_passes
    update = 6 * parameter_count * step_tokens * train_passes
    generation = 2 * parameter_count * generated_tokens
    metrics["throughput/mfu"] = (scoring + update + generation) / (step_seconds * world_size * peak)
    for name, flops, phase in (("logprob", scoring, "time/logprob_s"), ("update", update, "time/update_s")):
        if flops and seconds.get(phase):
            metrics[f"throughput/mfu_{name}"] = flops / (seconds[phase] * world_size * peak)
    return metrics

"""The ranges numeric config values must lie in, checked when a config is loaded (before anything is built).

The schema's types cannot say that a learning rate is positive or a probability lies in [0, 1]; this table
does, per schema class and field, so actor.optim and critic.optim share OptimizerConfig's rules. Written by
hand rather than by moving the schema to pydantic: OmegaConf already merges and type-checks the dataclasses,
and these few dozen ranges are all that is missing. A field left out of the table is only type-checked;
None (an Optional field switched off) is never range-checked; every float must be finite.
"""
import math
from dataclasses import dataclass, fields, is_dataclass
from typing import List

from . import schema
from .errors import ConfigError


@dataclass(frozen=True)
class Bound:
    """low <= value <= high (strict where low_open / high_open), or one of `special` (e.g. -1 meaning off)."""

    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False
    special: tuple = ()

    def holds(self, value) -> bool:
        if value in self.special:
            return True
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def describe(self) -> str:
        if self.high == math.inf:
            text = f"{'>' if self.low_open else '>='} {self.low:g}"
        else:
            text = f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        return " or ".join([*(f"{value:g}" for value in self.special), text])


AT_LEAST_1 = Bound(1)
NOT_NEGATIVE = Bound(0)
POSITIVE = Bound(0, low_open=True)
PROBABILITY = Bound(0, 1)
BELOW_1 = Bound(0, 1, high_open=True)

BOUNDS = {
    schema.ModelConfig: {"make_vocab_size_divisible_by": AT_LEAST_1, "moe_router_bias_update_rate": NOT_NEGATIVE},
    schema.ParallelConfig: {key: AT_LEAST_1 for key in ("tensor", "pipeline", "context", "expert",
                                                          "expert_tensor", "data")},
    schema.AugmentConfig: {"rotation_degrees": Bound(0, 180), "crop_fraction": BELOW_1},
    schema.DataConfig: {key: AT_LEAST_1 for key in ("prompts_per_step", "max_prompt_length", "min_pixels",
                                                     "max_pixels")},
    schema.VideoConfig: {"fps": POSITIVE, **{key: AT_LEAST_1 for key in ("min_frames", "max_frames", "min_pixels",
                                                                         "max_pixels", "total_pixels")}},
    schema.SGLangConfig: {"tensor_parallel": AT_LEAST_1, "mem_fraction_static": Bound(0, 1, low_open=True),
                          "start_timeout_s": POSITIVE, "request_timeout_s": POSITIVE, "max_retries": NOT_NEGATIVE,
                          "max_restarts": NOT_NEGATIVE, "retry_backoff_s": NOT_NEGATIVE,
                          "max_concurrent_requests": AT_LEAST_1},
    schema.EmbeddedEngineConfig: {"prefill_tokens": AT_LEAST_1, "admission_prompts": AT_LEAST_1,
                                  "cache_tokens": NOT_NEGATIVE},
    schema.MultiTurnConfig: {"max_turns": AT_LEAST_1, "max_total_tokens": AT_LEAST_1},
    schema.RolloutConfig: {"n": AT_LEAST_1, "temperature": NOT_NEGATIVE, "top_p": Bound(0, 1, low_open=True),
                           "top_k": Bound(1, special=(-1,)), "max_new_tokens": AT_LEAST_1,
                           "max_batch_size": AT_LEAST_1, "sync_bucket_mb": AT_LEAST_1},
    schema.AlgorithmConfig: {"gamma": PROBABILITY, "lam": PROBABILITY, "clip_low": BELOW_1, "clip_high": NOT_NEGATIVE,
                             "dual_clip": Bound(1, low_open=True), "kl_coef": NOT_NEGATIVE,
                             "entropy_coef": NOT_NEGATIVE, "tis_cap": POSITIVE, "max_refill_rounds": NOT_NEGATIVE,
                             "overlong_buffer": NOT_NEGATIVE, "overlong_penalty": NOT_NEGATIVE},
    schema.OptimizerConfig: {"lr": POSITIVE, "min_lr": NOT_NEGATIVE, "warmup_steps": NOT_NEGATIVE,
                             "weight_decay": NOT_NEGATIVE, "adam_beta1": BELOW_1, "adam_beta2": BELOW_1,
                             "grad_clip": NOT_NEGATIVE},
    schema.ActorConfig: {"micro_batch_tokens": AT_LEAST_1, "scoring_micro_batch_tokens": AT_LEAST_1,
                         "mini_batches_per_step": AT_LEAST_1, "ppo_epochs": AT_LEAST_1},
    schema.CriticConfig: {"value_clip": POSITIVE},
    schema.RewardConfig: {"format_weight": NOT_NEGATIVE, "timeout_s": POSITIVE, "reward_model_weight": NOT_NEGATIVE,
                          "reward_model_batch_size": AT_LEAST_1, "num_workers": AT_LEAST_1},
    schema.TrainerConfig: {"steps": NOT_NEGATIVE, "warmup_sft_steps": NOT_NEGATIVE, "warmup_sft_lr": POSITIVE,
                           "save_every": Bound(0, special=(-1,)), "eval_every": NOT_NEGATIVE,
                           "max_nonfinite_skips": NOT_NEGATIVE, "keep_last": NOT_NEGATIVE},
}


def out_of_bounds(section, prefix: str) -> List[str]:
    """`key=value must be ...` for each value of a schema section (and its subsections) out of its range."""
    problems = []
    rules = BOUNDS.get(type(section), {})
    for f in fields(section):
        value, key = getattr(section, f.name), prefix + f.name
        if is_dataclass(value):
            problems += out_of_bounds(value, key + ".")
        elif isinstance(value, float) and not math.isfinite(value):
            problems.append(f"{key}={value} must be a finite number")
        elif f.name in rules and isinstance(value, (int, float)) and not rules[f.name].holds(value):
            problems.append(f"{key}={value} must be {rules[f.name].describe()}")
    return problems


def _relations(config: "schema.Config") -> List[str]:
    """Pairs of values that are each in range but cannot hold together."""
    problems = []
    for role in ("actor", "critic"):
        optim = getattr(config, role).optim
        if optim.min_lr > optim.lr:
            problems.append(f"{role}.optim.min_lr={optim.min_lr} must not exceed {role}.optim.lr={optim.lr}")
    if config.data.min_pixels > config.data.max_pixels:
        problems.append(f"data.min_pixels={config.data.min_pixels} must not exceed "
                        f"data.max_pixels={config.data.max_pixels}")
    video = config.data.video
    for low, high in (("min_frames", "max_frames"), ("min_pixels", "max_pixels")):
        if getattr(video, low) > getattr(video, high):
            problems.append(f"data.video.{low}={getattr(video, low)} must not exceed "
                            f"data.video.{high}={getattr(video, high)}")
    return problems


def check_bounds(config: "schema.Config") -> None:
    """Raise one ConfigError naming every value out of its range (key=value and the allowed range)."""
    problems = out_of_bounds(config, "")
    problems += _relations(config) if not problems else []
    if problems:
        raise ConfigError("; ".join(problems))

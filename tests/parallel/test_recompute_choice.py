"""model.recompute=auto: the memory planner picks no recompute when the run fits without it, full recompute
when it does not, and plans an auto config exactly as the option it resolves to."""
from mmrl_megatron.config.schema import Config
from mmrl_megatron.parallel.memory_plan import choose_recompute, estimate, with_overrides
from mmrl_megatron.parallel.model_dims import BUILTIN_MODELS

BENCH_3B = ["data.prompts_per_step=64", "rollout.n=5", "rollout.max_new_tokens=512", "rollout.max_batch_size=320",
            "data.max_prompt_length=2048", "data.min_pixels=200704", "data.max_pixels=200704",
            "algorithm.kl_coef=0.001", "actor.mini_batches_per_step=4"]


def _peak(config, recompute, gpu_gib):
    return estimate(with_overrides(config, [f"model.recompute={recompute}"]), BUILTIN_MODELS["qwen2.5-vl-3b"], 1,
                    gpu_gib).peak_gib


def test_auto_recompute_is_the_least_that_fits():
    """Invariant: on a GPU between the two plans' peaks auto is full; above the no-recompute peak it is none;
    below both it falls back to full; and estimate() of an auto config equals that of its choice."""
    dims = BUILTIN_MODELS["qwen2.5-vl-3b"]
    config = with_overrides(Config(), BENCH_3B + ["actor.micro_batch_tokens=16384"])
    without, full = _peak(config, "none", 1000.0), _peak(config, "full", 1000.0)
    assert full < without  # recompute keeps less
    assert choose_recompute(config, dims, 1, without + 1.0) == "none"
    assert choose_recompute(config, dims, 1, (full + without) / 2) == "full"
    assert choose_recompute(config, dims, 1, full / 2) == "full"
    auto = with_overrides(config, ["model.recompute=auto"])
    assert estimate(auto, dims, 1, (full + without) / 2).peak_gib == full

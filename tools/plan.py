"""Estimate per-GPU memory of a run's layout, say whether it fits, and what to change if not.

    python tools/plan.py --config yaml_configs/grpo_qwen25vl_72b.yaml --gpus 32 [key=value ...]
    python tools/plan.py --config yaml_configs/grpo_qwen25vl_7b.yaml --model /ckpt/Qwen2.5-VL-7B-Instruct

The model's dimensions come from --model (a checkpoint directory, a config.json or a built-in name:
qwen2.5-vl-3b/7b/32b/72b, kimi-vl-a3b, qwen3-vl-2b/4b/8b/32b), else from model.hf_path (its config.json when
present, else the built-in shape its name contains), so no checkpoint is needed. Exit status: 0 fits, 1 does
not, 2 error.
"""
import argparse
import sys

from mmrl_megatron.config import ConfigError, load_config
from mmrl_megatron.parallel.memory_plan import estimate, format_plan, suggest_changes
from mmrl_megatron.models.planner_dims import resolve_model_dims


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML run config")
    parser.add_argument("--model", help="checkpoint directory, config.json or built-in name (default: model.hf_path)")
    parser.add_argument("--gpus", type=int, help="world size (default: the config's layout, data-parallel 1 "
                                                 "when parallel.data is null)")
    parser.add_argument("--gpu-memory-gb", type=float, default=80.0, help="memory of one GPU in GiB (default 80)")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
        dims = resolve_model_dims(args.model or config.model.hf_path)
        p = config.parallel
        gpus = args.gpus or p.tensor * p.pipeline * p.context * (p.data or 1)
        plan = estimate(config, dims, gpus, args.gpu_memory_gb)
        print(format_plan(plan))
        if not plan.fits:
            ways = suggest_changes(config, dims, gpus, args.gpu_memory_gb)
            if not ways:
                print("no single change or chain of changes tried fits; use more GPUs (--gpus) or a smaller model")
            for overrides, peak in ways:
                status = "fits" if peak <= args.gpu_memory_gb else "still too large"
                print(f"try: {' '.join(overrides)}  -> peak {peak:.1f} GiB ({status})")
        return 0 if plan.fits else 1
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

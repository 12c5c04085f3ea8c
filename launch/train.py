"""Reinforcement learning for a vision-language model; run on every rank.

    torchrun --nproc_per_node N launch/train.py --config yaml_configs/NAME.yaml [key=value ...]

Every key, its default and its meaning: mmrl_megatron/config/schema.py. Under Slurm: slurm/*.sh.
"""
import argparse
import logging
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML file from yaml_configs/")
    parser.add_argument("overrides", nargs="*", help="key=value pairs applied after the file, e.g. rollout.n=8")
    args = parser.parse_args(argv)
    from mmrl_megatron.config import ConfigError
    from mmrl_megatron.convert.errors import CheckpointError
    from mmrl_megatron.data import DataError
    from mmrl_megatron.parallel import detect_process_place
    from mmrl_megatron.trainer.run import run_training

    main_rank = detect_process_place().rank == 0
    logging.basicConfig(level=logging.INFO if main_rank else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s")
    try:
        run_training(args.config, args.overrides)
    except (ConfigError, DataError) as error:
        # a mistake in the config or the data: every rank finds the same one, so rank 0 alone prints the
        # message (it says what to change; a traceback would add nothing) and every rank exits with 2
        if main_rank:
            kind = "config error" if isinstance(error, ConfigError) else "data error"
            print(f"{kind}: {error}", file=sys.stderr)
        return 2
    except CheckpointError as error:  # a damaged or misfit checkpoint: the message names the file
        if main_rank:  # every rank raises the same message
            print(f"checkpoint error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # dist_checkpointing starts helper processes that re-import this file
    sys.exit(main())

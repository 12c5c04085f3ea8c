#!/usr/bin/env bash
# GRPO on Geometry3k with Kimi-VL-A3B-Instruct (MoE, 64 experts) on 2 nodes x 8 GPUs (80 GB): EP 8, SGLang TP 2.
# The layout and its memory: python tools/plan.py --config yaml_configs/grpo_kimivl_a3b.yaml --gpus 16
#
# Submit from the repository root (or set REPO_DIR), extra arguments are config overrides:
#   sbatch slurm/grpo_kimivl_a3b.sh [key=value ...]
# Print the srun and per-node torchrun commands without launching (works without Slurm installed):
#   bash slurm/grpo_kimivl_a3b.sh --dry-run [key=value ...]
# Checkpoints go to <run_dir>/checkpoints; before the time limit the job checkpoints, requeues and resumes
# (see slurm/common.sh).
#SBATCH --job-name=grpo_kimivl_a3b
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail

MMRL_JOB_NAME=grpo_kimivl_a3b
MMRL_DEFAULT_CONFIG=yaml_configs/grpo_kimivl_a3b.yaml
# sbatch runs a spooled copy of this file, so its own directory is not the repository there.
REPO_DIR="${REPO_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
[[ -f "$REPO_DIR/slurm/common.sh" ]] || REPO_DIR="${SLURM_SUBMIT_DIR:-$PWD}"
# shellcheck source=slurm/common.sh
source "$REPO_DIR/slurm/common.sh"
mmrl_main "$@"

#!/usr/bin/env bash
# GRPO on Geometry3k with Qwen2.5-VL-7B-Instruct on 1 node x 8 GPUs (80 GB), colocated rollout.
# Other single-model recipes reuse it: CONFIG=yaml_configs/ppo_qwen25vl_7b.yaml sbatch slurm/grpo_qwen25vl_7b.sh
#
# Submit from the repository root (or set REPO_DIR), extra arguments are config overrides:
#   sbatch slurm/grpo_qwen25vl_7b.sh [key=value ...]
# Print the srun and per-node torchrun commands without launching (works without Slurm installed):
#   bash slurm/grpo_qwen25vl_7b.sh --dry-run [key=value ...]
# Checkpoints go to <run_dir>/checkpoints; before the time limit the job checkpoints, requeues and resumes
# (see slurm/common.sh).
#SBATCH --job-name=grpo_qwen25vl_7b
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail

MMRL_JOB_NAME=grpo_qwen25vl_7b
MMRL_DEFAULT_CONFIG=yaml_configs/grpo_geo3k_qwen25vl_7b.yaml
# sbatch runs a spooled copy of this file, so its own directory is not the repository there.
REPO_DIR="${REPO_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
[[ -f "$REPO_DIR/slurm/common.sh" ]] || REPO_DIR="${SLURM_SUBMIT_DIR:-$PWD}"
# shellcheck source=slurm/common.sh
source "$REPO_DIR/slurm/common.sh"
mmrl_main "$@"

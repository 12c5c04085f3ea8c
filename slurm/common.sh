#!/usr/bin/env bash
# Shared body of the slurm/*.sh recipes: one torchrun per node under srun, c10d rendezvous on the first
# node, checkpoint-and-requeue before the time limit.
#
# A recipe sets MMRL_DEFAULT_CONFIG and MMRL_JOB_NAME, sources this file and calls `mmrl_main "$@"`.
# Arguments: --dry-run (print the commands, launch nothing) and key=value config overrides.
# Environment knobs (all optional): CONFIG (replaces the recipe's YAML), RUN_DIR (default
# runs/<job name>-<job id>, kept across requeues so the run resumes), GPUS_PER_NODE, MASTER_PORT,
# PYTHON and TORCHRUN (the interpreters on the nodes), MMRL_SRUN_ARGS (extra srun arguments, e.g. a
# container image), MMRL_SAVE_GRACE_S (seconds the trainer gets to checkpoint after the warning signal).
#
# Time limit: the recipes ask Slurm for SIGUSR1 300 s before the limit (--signal=B:USR1@300). The
# handler creates <run_dir>/SAVE_AND_EXIT, which the trainer polls between steps: it saves a checkpoint
# and exits 0. When srun has ended the job requeues itself and resumes from that checkpoint
# (trainer.resume=auto). A trainer that has not exited after MMRL_SAVE_GRACE_S is stopped, and the
# requeued job resumes from its last periodic checkpoint.
#
# srun runs this file on every node with --node-launch; the node's rank comes from SLURM_NODEID.

# Sequence parallelism's all-gathers rely on kernels running in launch order (one hardware queue).
# NVLink multicast (NVLS) stays off: it reserves memory per communicator that colocation needs.
mmrl_export_runtime_env() {
    export NCCL_NVLS_ENABLE="${NCCL_NVLS_ENABLE:-0}"
    export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"
    export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
    export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"
    export PYTHONUNBUFFERED=1
}

# One hostname per line. scontrol when present; otherwise the package's own expander, so dry runs work
# on machines without Slurm's tools.
mmrl_hosts() {
    local nodelist="${SLURM_JOB_NODELIST:-${SLURM_NODELIST:-}}"
    if [[ -z "$nodelist" ]]; then
        hostname
    elif command -v scontrol >/dev/null 2>&1; then
        scontrol show hostnames "$nodelist"
    else
        # Loaded by path: importing the package would import torch, seconds on a login node.
        "${PYTHON:-python3}" -c 'import importlib.util as u, sys
spec = u.spec_from_file_location("slurm_nodes", sys.argv[1]); nodes = u.module_from_spec(spec)
spec.loader.exec_module(nodes); print("\n".join(nodes.expand_nodelist(sys.argv[2])))' \
            "$REPO_DIR/mmrl_megatron/parallel/slurm_nodes.py" "$nodelist"
    fi
}

# Fills the job-wide settings that every node must agree on, and exports them for srun's tasks.
mmrl_job_settings() {
    mapfile -t MMRL_HOSTS < <(mmrl_hosts)
    local gpus_from_slurm="${SLURM_GPUS_PER_NODE:-}"
    export MMRL_NNODES="${#MMRL_HOSTS[@]}"
    export MMRL_GPUS_PER_NODE="${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-${gpus_from_slurm##*:}}}"
    MMRL_GPUS_PER_NODE="${MMRL_GPUS_PER_NODE:-8}"
    export MMRL_JOB_ID="${SLURM_JOB_ID:-local}"
    export MASTER_ADDR="${MMRL_HOSTS[0]}"
    # A port derived from the job id keeps two jobs that share a first node apart.
    export MASTER_PORT="${MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}"
    export MMRL_CONFIG="${CONFIG:-$MMRL_DEFAULT_CONFIG}"
    export MMRL_RUN_DIR="${RUN_DIR:-$REPO_DIR/runs/$MMRL_JOB_NAME-$MMRL_JOB_ID}"
}

# MMRL_COMMAND := the torchrun command of node $1, then the config overrides $2...
mmrl_torchrun_command() {
    local node_rank="$1"
    shift
    MMRL_COMMAND=("${TORCHRUN:-torchrun}" --nnodes="$MMRL_NNODES" --nproc_per_node="$MMRL_GPUS_PER_NODE"
        --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv_id="$MMRL_JOB_ID"
        --node_rank="$node_rank" --max_restarts=0
        launch/train.py --config "$MMRL_CONFIG" trainer.run_dir="$MMRL_RUN_DIR" trainer.resume=auto "$@")
}

mmrl_srun_command() {
    local extra=()
    read -r -a extra <<< "${MMRL_SRUN_ARGS:-}"
    MMRL_SRUN=(srun --nodes="$MMRL_NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1 "${extra[@]}"
        bash "$REPO_DIR/slurm/common.sh" --node-launch "$@")
}

mmrl_print_dry_run() {
    local rank
    echo "# ${MMRL_NNODES} node(s) x ${MMRL_GPUS_PER_NODE} GPUs: ${MMRL_HOSTS[*]}"
    echo "# rendezvous ${MASTER_ADDR}:${MASTER_PORT}; run dir ${MMRL_RUN_DIR}; checkpoints ${MMRL_RUN_DIR}/checkpoints"
    echo "export NCCL_NVLS_ENABLE=$NCCL_NVLS_ENABLE CUDA_DEVICE_MAX_CONNECTIONS=$CUDA_DEVICE_MAX_CONNECTIONS" \
        "TORCH_NCCL_ASYNC_ERROR_HANDLING=$TORCH_NCCL_ASYNC_ERROR_HANDLING NCCL_DEBUG=$NCCL_DEBUG OMP_NUM_THREADS=$OMP_NUM_THREADS"
    printf '%q ' "${MMRL_SRUN[@]}"
    echo
    for rank in "${!MMRL_HOSTS[@]}"; do
        mmrl_torchrun_command "$rank" "$@"
        printf 'node %s %s: ' "$rank" "${MMRL_HOSTS[$rank]}"
        printf '%q ' "${MMRL_COMMAND[@]}"
        echo
    done
}

mmrl_on_time_limit() {
    MMRL_SAVE_REQUESTED=1
    touch "$MMRL_RUN_DIR/SAVE_AND_EXIT"
    echo "[$(date -u +%FT%TZ)] time limit near: asked the trainer to checkpoint and exit (${MMRL_RUN_DIR}/SAVE_AND_EXIT)"
    # Its output goes nowhere so that a leftover sleep never holds the job's log open.
    (sleep "${MMRL_SAVE_GRACE_S:-240}" && kill -TERM "$MMRL_SRUN_PID") >/dev/null 2>&1 &
    MMRL_GRACE_PID=$!
}

# Waits for srun; the warning signal interrupts `wait`, so wait again while srun is still running.
mmrl_wait_for_srun() {
    local status
    while true; do
        status=0
        wait "$MMRL_SRUN_PID" || status=$?
        if ((status <= 128)) || ! kill -0 "$MMRL_SRUN_PID" 2>/dev/null; then
            return "$status"
        fi
    done
}

mmrl_main() {
    local dry_run=0 overrides=() argument status=0
    for argument in "$@"; do
        if [[ "$argument" == "--dry-run" ]]; then dry_run=1; else overrides+=("$argument"); fi
    done
    mmrl_export_runtime_env
    mmrl_job_settings
    mmrl_srun_command "${overrides[@]}"
    if [[ ! -f "$REPO_DIR/$MMRL_CONFIG" && ! -f "$MMRL_CONFIG" ]]; then
        echo "config ${MMRL_CONFIG} not found (relative paths are from ${REPO_DIR}); set CONFIG=<yaml>" >&2
        ((dry_run)) || return 2
    fi
    if ((dry_run)); then
        mmrl_print_dry_run "${overrides[@]}"
        return 0
    fi
    mkdir -p "$MMRL_RUN_DIR"
    rm -f "$MMRL_RUN_DIR/SAVE_AND_EXIT"  # left by the previous allocation of a requeued job
    MMRL_SAVE_REQUESTED=0 MMRL_SRUN_PID="" MMRL_GRACE_PID=""
    trap mmrl_on_time_limit USR1
    echo "[$(date -u +%FT%TZ)] job ${MMRL_JOB_ID} (restart ${SLURM_RESTART_COUNT:-0}) on ${MMRL_HOSTS[*]}; run dir ${MMRL_RUN_DIR}"
    "${MMRL_SRUN[@]}" &
    MMRL_SRUN_PID=$!
    mmrl_wait_for_srun || status=$?
    if [[ -n "$MMRL_GRACE_PID" ]]; then kill "$MMRL_GRACE_PID" 2>/dev/null || true; fi
    if ((MMRL_SAVE_REQUESTED)); then
        echo "[$(date -u +%FT%TZ)] srun ended (status ${status}); requeueing job ${MMRL_JOB_ID} to resume"
        scontrol requeue "$MMRL_JOB_ID"
        return 0
    fi
    return "$status"
}

mmrl_node_launch() {
    cd "$REPO_DIR" || exit 1
    mmrl_torchrun_command "${SLURM_NODEID:?--node-launch runs under srun, which sets SLURM_NODEID}" "$@"
    exec "${MMRL_COMMAND[@]}"
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    set -euo pipefail
    if [[ "${1:-}" != "--node-launch" ]]; then
        echo "slurm/common.sh is sourced by the slurm/*.sh recipes; run one of those" >&2
        exit 2
    fi
    shift
    REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    mmrl_node_launch "$@"
fi

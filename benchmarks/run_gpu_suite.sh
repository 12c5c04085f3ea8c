#!/usr/bin/env bash
# Every GPU figure in benchmarks/RESULTS.md, in two parts that each fit a 10-minute call on one GPU:
#   bash benchmarks/run_gpu_suite.sh tests-rollout OUT_DIR   # pytest -m gpu, bench_rollout, bench_sync, bench_logprob, bench_attention
#   bash benchmarks/run_gpu_suite.sh train-step OUT_DIR      # bench_train (with a profile), bench_step
# Each command has its own time limit and writes its log to OUT_DIR as it goes, so one slow or failing
# part leaves the others' figures. Packages the machine lacks are installed first from .whl/ when present
# (see benchmarks/RESULTS.md for how the wheels are fetched).
set -uo pipefail
part=${1:?part: tests-rollout or train-step}
out=${2:?output directory}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
python3 -c 'import torch, transformers; print(torch.__version__, transformers.__version__, torch.cuda.get_device_name())' \
  | tee "$out/versions.txt"

run() {  # run LIMIT_SECONDS NAME COMMAND...: the command's output goes to OUT_DIR/NAME.log
  local limit=$1 name=$2
  shift 2
  echo "== $name (limit ${limit}s)"
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  echo "== $name exit $?"
  tail -n 4 "$out/$name.log"
}

case $part in
  tests-rollout)
    export QWEN_GPU_RESULTS=$out/gpu_tests.jsonl KIMI_VL_GPU_RESULTS=$out/gpu_tests.jsonl \
      PLAN_GPU_RESULTS=$out/gpu_tests.jsonl
    run 240 pytest_gpu python3 -m pytest -m gpu -q -s -p no:cacheprovider tests
    run 180 bench_rollout python3 benchmarks/bench_rollout.py
    run 90 bench_sync python3 benchmarks/bench_sync.py
    run 45 bench_logprob python3 benchmarks/bench_logprob.py
    run 40 bench_attention python3 benchmarks/bench_attention.py
    ;;
  train-step)
    run 270 bench_train python3 benchmarks/bench_train.py --profile-dir "$out"
    run 290 bench_step python3 benchmarks/bench_step.py
    ;;
  *)
    echo "unknown part $part" >&2
    exit 2
    ;;
esac

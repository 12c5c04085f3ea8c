#!/usr/bin/env bash
# One GPU call's worth of checks while working on the hot path: the GPU tests that guard it, then a short
# GRPO step benchmark with the pass profile. Usage: bash benchmarks/gpu_iteration.sh OUT_DIR [bench_step args]
set -uo pipefail
out=${1:?output directory}
shift
mkdir -p "$out"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
python3 -c 'import torch, inspect; from torch.nn.attention.varlen import varlen_attn; print(torch.__version__, torch.cuda.get_device_name(), inspect.signature(varlen_attn))' \
  | tee "$out/versions.txt"
echo "== gpu tests"
timeout 200 python3 -m pytest -m gpu -q -x -p no:cacheprovider tests/models/test_core_attention.py \
  tests/models/test_fused_rope.py tests/models/test_fused_logprobs.py tests/trainer/test_hot_path_gpu.py tests/trainer/test_wgrad_fusion.py \
  tests/models/test_qwen2_5_vl_gpu.py > "$out/gpu_tests.log" 2>&1
echo "== gpu tests exit $?"
tail -n 30 "$out/gpu_tests.log"
echo "== bench_step $*"
timeout "${BENCH_TIMEOUT:-330}" python3 benchmarks/bench_step.py "$@" > "$out/bench_step.log" 2>&1
echo "== bench_step exit $?"
grep -E '^\{|^\|' "$out/bench_step.log" | tail -n 6
grep -iE "error|Traceback" "$out/bench_step.log" | head -n 5

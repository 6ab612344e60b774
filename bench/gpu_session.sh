#!/usr/bin/env bash
# The one prepared GPU check of issue 9 (H100/H200, about 10 minutes of a 15-minute lease):
#   1. the CUDA-only tests: the CUDA-graph column loop and the bf16 Hessian GEMM against the eager/fp32 paths,
#      CUDA vs CPU GPTQ (pytest -m gpu);
#   2. bench/gpu_probe.py on INF-34B's real layer shapes (3 layers): GPTQ w4 128x2048 and AWQ w4 128x512 eager,
#      then verify of the GPTQ output at 4096-token windows;
#   3. GPTQ again with the opt-in CUDA paths on, if step 1 passed.
# Every result is a JSON line (or pytest's summary) in $OUT/gpu_session.log; record them in bench/RESULTS.md.
# Usage: OUT=/tmp/out bash bench/gpu_session.sh        (the device tool sets $OUT)
set -u
OUT=${OUT:-/tmp/gpu-session}
mkdir -p "$OUT"
LOG="$OUT/gpu_session.log"
PY=${PY:-python}
export HF_HUB_OFFLINE=1
cd "$(dirname "$0")/.."
{
  date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  echo "== 1. CUDA-only tests"
  timeout 180 $PY -m pytest -q -m gpu tests/test_gptq.py 2>&1 | tail -15
  gpu_tests=${PIPESTATUS[0]}
  echo "== 2. probe, eager (GPTQ, AWQ, verify at 4096)"
  timeout 330 $PY bench/gpu_probe.py --out /tmp/probe --verify-seqlen 4096 2>&1 | grep -v '^\s*$' | tail -20
  if [ "$gpu_tests" = 0 ]; then
    echo "== 3. probe, GPTQ with --unproven-cuda graph-columns bf16-hessian"
    timeout 150 $PY bench/gpu_probe.py --out /tmp/probe-optin --methods gptq \
      --unproven-cuda graph-columns bf16-hessian 2>&1 | grep -v '^\s*$' | tail -8
  else
    echo "== 3. skipped: the CUDA-only tests failed (rc $gpu_tests)"
  fi
  date -u
} 2>&1 | tee "$LOG"

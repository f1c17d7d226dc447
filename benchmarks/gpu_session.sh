#!/bin/bash
# What a session with the GPU host checks and measures, in as few device calls as possible
# (each machine start costs a minute of the session's 30). Run from the repository root there:
#   bash benchmarks/gpu_session.sh OUT_DIR [STEP ...]
# STEPs (default: all, in this order; each fits one 10-minute call):
#   tests    kernel and served-layer tests on real bf16 hardware (test_kernels*, test_vllm_layers)
#   kernels  benchmarks/bench_kernels.py   -> OUT_DIR/kernels.csv, kernels.png
#   metrics  benchmarks/bench_metrics_overhead.py -> OUT_DIR/metrics_overhead.csv
#   train    benchmarks/bench_train.py     -> OUT_DIR/train.csv
# Every step's log goes to OUT_DIR/STEP.log; the script goes on after a failing step and
# exits non-zero if any failed. Copy the CSVs to benchmarks/results/ and the figures to
# benchmarks/RESULTS.md (with the GPU, the date and the commit) back on the CPU box.
set -uo pipefail
OUT=${1:?usage: gpu_session.sh OUT_DIR [tests|kernels|metrics|train ...]}
shift
STEPS=${*:-tests kernels metrics train}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
# The image has torch, triton, pytest, prometheus-client, safetensors, transformers; only our
# package is missing (its kernels/ dir maps to mole_serve.kernels, hence an install).
python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
git rev-parse --short HEAD 2>/dev/null | tee -a "$OUT/gpu.txt"

failed=0
for step in $STEPS; do
  case $step in
    tests)   cmd=(python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py
                  tests/test_kernels_compile.py tests/test_vllm_layers.py) ;;
    kernels) cmd=(python3 benchmarks/bench_kernels.py --out "$OUT") ;;
    metrics) cmd=(python3 benchmarks/bench_metrics_overhead.py --out "$OUT") ;;
    train)   cmd=(python3 benchmarks/bench_train.py --out "$OUT") ;;
    *) echo "unknown step $step" >&2; exit 2 ;;
  esac
  echo "== $step: ${cmd[*]}"
  start=$(date +%s)
  "${cmd[@]}" 2>&1 | tee "$OUT/$step.log" || { failed=1; echo "== $step FAILED"; }
  echo "== $step took $(( $(date +%s) - start )) s"
done
exit $failed

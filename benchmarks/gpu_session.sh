#!/bin/bash
# What a session with the GPU host checks and measures, in as few device calls as possible
# (each machine start costs a minute of the session's 30). Run from the repository root there:
#   bash benchmarks/gpu_session.sh OUT_DIR STEP ...
# STEPs (at least one; each fits one 10-minute call, not several together):
#   tune     benchmarks/tune_tiles.py      -> OUT_DIR/tiles.csv and the device's tuned table,
#            also installed in $HOME/mole-tuned, which every later step (and call of the
#            same warm lease) reads
#   kernels  benchmarks/bench_kernels.py   -> OUT_DIR/kernels.csv, kernels.png
#   tests    kernel and served-layer tests on real bf16 hardware (test_kernels*, test_vllm_layers)
#   metrics  benchmarks/bench_metrics_overhead.py -> OUT_DIR/metrics_overhead.csv
#   train    benchmarks/bench_train.py     -> OUT_DIR/train.csv
# and, for vLLM 0.26.0 (../shared/gpu-offline; build its bundle on the CPU box into the
# git-ignored .gpu-bundle/ and copy stage.sh and install.sh beside the pieces):
#   stage    copy the carried bundle piece(s) into $HOME/stage: one call per piece, back to
#            back (run(carry=[".gpu-bundle/part.0N", ".gpu-bundle/stage.sh",
#            ".gpu-bundle/install.sh"]): a machine idle 30 s between calls is lost, with it)
#   vllm     with the last piece: install vLLM and this package into $HOME/site
#   serving-tests  the in-process engine, `vllm serve`, trained-adapter and quantised-base tests on
#            the GPU (auto backend = the Triton kernels, plus the reference backend; the
#            engine tests also compiled with CUDA graphs) with VLLM_GPU_SYNC_CHECK=warn: the log's
#            warnings summary lists the in-process engines' host syncs by source line (vLLM's
#            LoRA metadata syncs on mapping changes; none may be under mole_serve/ or kernels/)
#   serving  benchmarks/bench_serving.py at 7B shape -> OUT_DIR/serving.csv and plots;
#            $SERVING_ARGS (default: the mole config, N = 1, 8, 32 adapters, rates 4, 16 and
#            inf (all at once: the saturated throughput), 80 requests a point; three cold 7B
#            servers do not fit one 10-minute call: `--configs base,lora` in the next call
#            adds its rows to the same serving.csv: the device empties OUT_DIR before each
#            call, so the CSV of the lease's earlier serving calls ($HOME/serving-out) is
#            put there first and saved back after, and the plots show all its rows; rows
#            are written to OUT_DIR as they are measured, so a cut-off run keeps them)
# Every step's log goes to OUT_DIR/STEP.log; the script goes on after a failing step and
# exits non-zero if any failed. The checkout sent to the host has no .git: run it as
# `MOLE_SERVE_COMMIT=<short sha> bash benchmarks/gpu_session.sh ...` (the CSVs name it).
# Copy the CSVs to benchmarks/results/ and the figures to benchmarks/RESULTS.md (with the
# GPU, the date and the commit) back on the CPU box.
set -uo pipefail
USAGE="usage: gpu_session.sh OUT_DIR STEP... (stage vllm serving-tests serving tune kernels
  tests metrics train)"
OUT=${1:?$USAGE}
shift
[ $# -gt 0 ] || { echo "$USAGE" >&2; exit 2; }
STEPS=$*
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
# The image has torch, triton, pytest, prometheus-client, safetensors, transformers; only our
# package is missing (its kernels/ dir maps to mole_serve.kernels, hence an install).
python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
echo "commit $(cd benchmarks && python3 -c 'import provenance; print(provenance.commit())')" \
  | tee -a "$OUT/gpu.txt"

# vLLM (installed by the `vllm` step of this call or of an earlier call of the same lease)
export VLLM_USE_FLASHINFER_SAMPLER=0 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
  VLLM_NO_USAGE_STATS=1
# $HOME/site precedes the editable install on the path: refresh our copy there from this
# call's checkout, or a fix sent between calls of one lease would not run.
# pip --upgrade --target replaces $HOME/site/bin (our console script): write vLLM's CLI again.
install_site_copy() {
  python3 -m pip install -q --no-deps --no-index --no-build-isolation --upgrade \
    --target "$HOME/site" . || echo "== could not refresh $HOME/site: steps run an older copy"
  mkdir -p "$HOME/site/bin" &&
    printf '#!/bin/sh\nexec python3 -m vllm.entrypoints.cli.main "$@"\n' > "$HOME/site/bin/vllm" &&
    chmod +x "$HOME/site/bin/vllm"
}
export -f install_site_copy
if [ -d "$HOME/site/vllm" ]; then
  export PYTHONPATH=$HOME/site${PYTHONPATH:+:$PYTHONPATH} PATH=$HOME/site/bin:$PATH
  install_site_copy
fi
export VLLM_CACHE_ROOT=${VLLM_CACHE_ROOT:-$HOME/vllm-cache}  # compiled graphs, across calls
# Tuned tiles survive between the calls of one warm lease ($HOME stays, the checkout is
# re-sent); a fresh machine has none, and every step then runs on the untuned table.
export MOLE_SERVE_TUNED_CONFIG_FOLDER=$HOME/mole-tuned
echo "tuned tiles: $(ls "$MOLE_SERVE_TUNED_CONFIG_FOLDER" 2>/dev/null || echo none)" \
  | tee -a "$OUT/gpu.txt"
SERVING_ARGS=${SERVING_ARGS:---configs mole --adapters 1,8,32 --rates 4,16,inf --num-requests 80}
SERVING_OUT=$HOME/serving-out

failed=0
for step in $STEPS; do
  case $step in
    stage)   cmd=(bash .gpu-bundle/stage.sh .gpu-bundle) ;;
    vllm)    cmd=(bash -c 'bash .gpu-bundle/install.sh .gpu-bundle && install_site_copy &&
                  PYTHONPATH=$HOME/site python3 -c \
                    "import vllm, mole_serve.kernels; print(vllm.__version__)"')
             export PYTHONPATH=$HOME/site${PYTHONPATH:+:$PYTHONPATH} PATH=$HOME/site/bin:$PATH ;;
    serving-tests) cmd=(env VLLM_GPU_SYNC_CHECK=warn python3 -m pytest -q -p no:cacheprovider
                        tests/test_vllm_engine.py tests/test_vllm_trained.py
                        tests/test_vllm_serve.py tests/test_vllm_quantized.py) ;;
    serving) read -ra serving_args <<< "$SERVING_ARGS"
             cp "$SERVING_OUT/serving.csv" "$OUT/" 2>/dev/null
             cmd=(python3 benchmarks/bench_serving.py --shape llama2-7b --out "$OUT"
                  "${serving_args[@]}") ;;
    tests)   cmd=(python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py
                  tests/test_kernels_compile.py tests/test_vllm_layers.py) ;;
    tune)    cmd=(python3 benchmarks/tune_tiles.py --out "$OUT" --install) ;;
    kernels) cmd=(python3 benchmarks/bench_kernels.py --out "$OUT") ;;
    metrics) cmd=(python3 benchmarks/bench_metrics_overhead.py --out "$OUT") ;;
    train)   cmd=(python3 benchmarks/bench_train.py --out "$OUT") ;;
    *) echo "unknown step $step" >&2; exit 2 ;;
  esac
  echo "== $step: ${cmd[*]}"
  start=$(date +%s)
  "${cmd[@]}" 2>&1 | tee "$OUT/$step.log" || { failed=1; echo "== $step FAILED"; }
  if [ "$step" = serving ]; then
    mkdir -p "$SERVING_OUT" && cp "$OUT/serving.csv" "$SERVING_OUT/" 2>/dev/null
  fi
  echo "== $step took $(( $(date +%s) - start )) s"
done
exit $failed

#!/usr/bin/env bash
# One call on the GPU machine (see ../shared/GPU.md): build the extension from source against the
# device's own torch, run the CUDA tests, compute-sanitizer on a small case, and the benchmark suite.
# Logs and JSON go to $OUT (or build/gpu_check when unset; 8 files at most, the device tool's limit).
# Exit status: non-zero if any step failed.
#   bash bench/gpu_check.sh            # everything
#   SKIP_BENCH=1 bash bench/gpu_check.sh   # build + tests (split across two device calls when one
#   SKIP_TESTS=1 bash bench/gpu_check.sh   # build + benchmarks   would run past the 10-minute limit)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-build/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 DEEPKERNELS_REQUIRE_CUDA=1
PY=${PYTHON:-python3}
status=0
step() { echo "=== $1 ($(date +%T))"; }

step "environment"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$OUT/env.txt"
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())" | tee -a "$OUT/env.txt"

step "wheels carried in .whl (optional)"
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

step "build (sm_90a only unless DEEPKERNELS_CUDA_ARCHS is set)"
export DEEPKERNELS_CUDA_ARCHS=${DEEPKERNELS_CUDA_ARCHS:-90a} MAX_JOBS=${MAX_JOBS:-16} NVCC_THREADS=${NVCC_THREADS:-1}
[ -x /usr/local/cuda/bin/nvcc ] && export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
rm -f deepkernels/_C*.so
if $PY setup.py build_ext --inplace > "$OUT/build.log" 2>&1; then
  $PY tools/ptxas_report.py "$OUT/build.log" "$OUT/ptxas.txt" || status=1
else
  echo "BUILD FAILED"; grep -E -B2 -A6 'error' "$OUT/build.log" | tail -60; exit 1
fi
tail -3 "$OUT/build.log"

if [ "${SKIP_TESTS:-0}" != 1 ]; then
step "pytest -m cuda"
$PY -m pytest -q -rs -m cuda tests 2>&1 | tee "$OUT/pytest_cuda.log" | tail -40
[ "${PIPESTATUS[0]}" = 0 ] || status=1

# Both opt-in sm_90a kernels append to one log (the device tool returns at most 8 files from $OUT).
step "pytest -m cuda: the GEMM and training tests with the opt-in sm_90a wgmma GEMMs (forward + wgrad)"
DEEPKERNELS_GEMM_SM90=1 $PY -m pytest -q -rs -m cuda tests/test_gemm.py tests/test_wgrad.py tests/test_nn_linear.py \
  tests/test_training.py 2>&1 | tee "$OUT/pytest_sm90.log" | tail -15
[ "${PIPESTATUS[0]}" = 0 ] || status=1

step "pytest -m cuda tests/test_mla.py with the opt-in sm_90a wgmma MLA decode"
DEEPKERNELS_MLA_SM90=1 $PY -m pytest -q -rs -m cuda tests/test_mla.py 2>&1 | tee -a "$OUT/pytest_sm90.log" | tail -15
[ "${PIPESTATUS[0]}" = 0 ] || status=1

step "pytest -m cuda tests/test_mla.py with the FlashMLA-structured sm_90a kernel (DEEPKERNELS_MLA_VARIANT=sm90_pipelined)"
DEEPKERNELS_MLA_VARIANT=sm90_pipelined $PY -m pytest -q -rs -m cuda tests/test_mla.py 2>&1 | tee -a "$OUT/pytest_sm90.log" | tail -15
[ "${PIPESTATUS[0]}" = 0 ] || status=1

step "the emulator against the hardware: every kernel on the same inputs (appended to pytest_cuda.log)"
$PY -m bench.emu_vs_gpu 2>&1 | tee -a "$OUT/pytest_cuda.log" | tail -25
[ "${PIPESTATUS[0]}" = 0 ] || status=1

step "pytest -m 'not cuda' (the CPU tests, against the device's torch)"
$PY -m pytest -q -m "not cuda" tests 2>&1 | tail -5
[ "${PIPESTATUS[0]}" = 0 ] || status=1

step "compute-sanitizer (memcheck) on small cases"
if command -v compute-sanitizer >/dev/null; then
  compute-sanitizer --tool memcheck --error-exitcode 1 $PY -m pytest -q -m cuda -k "sanitizer or (cast and not 4096)" tests \
    > "$OUT/sanitizer.log" 2>&1 || { status=1; echo "SANITIZER FAILED"; }
  tail -5 "$OUT/sanitizer.log"
else
  echo "compute-sanitizer not found"
fi
fi  # SKIP_TESTS

if [ "${SKIP_BENCH:-0}" != 1 ]; then
  step "python -m bench all"
  $PY -m bench all --out "$OUT/bench.json" 2>&1 | tee "$OUT/bench.txt" || status=1
  step "python -m bench sweep (every variant; writes this device's entries of deepkernels/tuning/gemm_sm90.json)"
  # $OUT holds 8 files at most: the sweep and the table it wrote are appended to bench.txt.
  $PY -m bench sweep --budget-s ${SWEEP_BUDGET_S:-240} 2>&1 | tee -a "$OUT/bench.txt" | tail -30
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
  { echo "=== deepkernels/tuning/gemm_sm90.json"; cat deepkernels/tuning/gemm_sm90.json; } >> "$OUT/bench.txt"
fi
echo "=== gpu_check exit status $status"
echo "=== next, on the development machine: python -m bench report --ingest <files_at>/bench.json; commit bench/results docs"
exit $status

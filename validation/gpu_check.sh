#!/usr/bin/env bash
# The GPU checks of issue 3 in one run, for a machine with an NVIDIA GPU on which python3 has
# numba (with numba.cuda), torch, pytest and hypothesis: the CUDA kernels' tests on the real GPU
# (tests/test_kernels_cuda.py, realistic shapes included), then validation/bench_gpu.py
# (W1-W3 against torch on the same GPU).  Each stage is time-boxed; logs and results go to OUTDIR.
#
#     bash validation/gpu_check.sh OUTDIR
set -u
cd "$(dirname "$0")/.."
OUTDIR=${1:-validation/results/gpu}
mkdir -p "$OUTDIR"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
export NUMBA_CUDA_LOW_OCCUPANCY_WARNINGS=0   # small grids are the point of W1 and W3
# Not installed: give the source tree setup.py's layout (kernels/ is the subpackage npbptt.kernels).
[ -e npbptt/kernels ] || python3 -c "import npbptt.kernels" 2>/dev/null || ln -s ../kernels npbptt/kernels
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  python3 -c "import sys, numpy, numba, torch; from numba import cuda; print('python', sys.version.split()[0], 'numpy', numpy.__version__, 'numba', numba.__version__, 'numba.cuda', getattr(cuda, 'implementation', '?'), 'numba-cuda', __import__('importlib.metadata').metadata.version('numba-cuda') if cuda.implementation == 'NVIDIA' else '-', 'torch', torch.__version__, 'cuda available', cuda.is_available())"
} 2>&1 | tee "$OUTDIR/env.txt"
timeout "${PYTEST_TIMEOUT:-200}" python3 -m pytest -q -p no:cacheprovider --durations=5 \
  --hypothesis-profile=gpu-check -p no:warnings -k "not under_the_simulator" tests/test_kernels_cuda.py \
  2>&1 | tee "$OUTDIR/pytest_gpu.txt"
echo "pytest exit: ${PIPESTATUS[0]}" | tee -a "$OUTDIR/pytest_gpu.txt"
timeout "${BENCH_TIMEOUT:-280}" python3 validation/bench_gpu.py --out "$OUTDIR" \
  --warmup 0.05 --min-time 0.1 2>&1 | tee "$OUTDIR/bench_gpu.log"
echo "bench exit: ${PIPESTATUS[0]}" | tee -a "$OUTDIR/bench_gpu.log"
timeout "${PROFILE_TIMEOUT:-90}" python3 validation/profile_gpu.py --out "$OUTDIR" > "$OUTDIR/profile_gpu.log" 2>&1
echo "profile exit: $?"; head -12 "$OUTDIR/profile_gpu.log"

#!/usr/bin/env bash
# One call on a GPU machine: build pathkernel with CUDA, run the CUDA tests (both fused
# kernels), time the kernels (bench/gpu_bench.py). Logs and RESULTS.md land in $OUT.
#
# The GPU image has torch, numpy, pybind11, scikit-build-core and CMake but not
# scipy-openblas32: carry it as a wheel. Once, here:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --platform manylinux_2_28_x86_64 -d .whl scipy-openblas32
# then run with carry [".whl"]:  bash bench/gpu_check.sh
set -uo pipefail
OUT=${OUT:-/tmp/pathkernel-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps .whl/*.whl 2>&1 | tail -2
fi
# sm_90a only here (the card is Hopper; CI compiles sm_80 and sm_90a): half the compile time.
python3 -m pip install --no-build-isolation --no-deps -v \
  --config-settings=cmake.define.PATHKERNEL_CUDA=ON \
  --config-settings=cmake.define.PATHKERNEL_CUDA_ARCHITECTURES=90a . > "$OUT/build.log" 2>&1
rc=$?
tail -3 "$OUT/build.log"
[ $rc -eq 0 ] || { echo "build failed (rc=$rc)"; exit $rc; }
python3 -c "import pathkernel as pk; print(pk.backend_info())"
cd tests
timeout 150 python3 -m pytest test_cuda.py -q --tb=short 2>&1 | tee "$OUT/tests.log" | tail -4
for v in ${GPU_VARIANTS:-ldm16 wg32 ws}; do
  echo "variant $v:"
  PATHKERNEL_CUDA_FUSED=$v timeout 90 python3 -m pytest test_cuda.py -q --tb=short -k "kernels or pipeline or variant" 2>&1 \
    | tee -a "$OUT/tests_variants.log" | tail -2
done
if ! grep -q " passed" "$OUT/tests.log" || grep -q "Fatal Python error" "$OUT/tests.log"; then
  cuda-gdb -q -batch -ex run -ex bt --args python3 -m pytest test_cuda.py -q -x -k bad_cuda \
    > "$OUT/gdb.log" 2>&1
  grep -A25 "SIGSEGV" "$OUT/gdb.log" | head -40
fi
if [ -n "${GPU_NCU:-}" ]; then  # stall reasons of one bf16 launch of variant $GPU_NCU
  timeout 120 ncu --clock-control none --section SpeedOfLight --section Occupancy \
    --section WarpStateStats --section SchedulerStats --section LaunchStats \
    -k regex:"fused_mma|ws_kernel" -s 1 -c 1 python3 ../bench/gpu_bench.py --profile "$GPU_NCU" \
    > "$OUT/ncu.log" 2>&1
  grep -iE "Duration|Throughput|Registers Per|Achieved Occupancy|stall|Issued Warp|Eligible" \
    "$OUT/ncu.log" | cut -c1-220 | head -40
fi
cd ..
cp bench/RESULTS.md "$OUT/RESULTS.md" 2>/dev/null || true
timeout 150 python3 bench/gpu_bench.py --out "$OUT/RESULTS.md" ${GPU_BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log"

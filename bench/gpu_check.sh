#!/usr/bin/env bash
# One call on a GPU machine: build pathkernel with CUDA, run the CUDA and native tests, time
# the kernels (bench/gpu_bench.py). Logs and RESULTS.md land in $OUT.
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
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps .whl/*.whl 2>&1 | tail -2
fi
python3 -m pip install --no-build-isolation --no-deps -v \
  --config-settings=cmake.define.PATHKERNEL_CUDA=ON . > "$OUT/build.log" 2>&1
rc=$?
tail -5 "$OUT/build.log"
[ $rc -eq 0 ] || { echo "build failed (rc=$rc)"; exit $rc; }
python3 -c "import pathkernel as pk; print(pk.backend_info())" | tee "$OUT/info.txt"
cd tests && python3 -m pytest test_cuda.py test_native.py test_tangent.py -q -x 2>&1 | tee "$OUT/tests.log" | tail -15
cd ..
cp bench/RESULTS.md "$OUT/RESULTS.md" 2>/dev/null || true
timeout 300 python3 bench/gpu_bench.py --out "$OUT/RESULTS.md" 2>&1 | tee "$OUT/bench.log"

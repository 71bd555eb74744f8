#!/usr/bin/env bash
# Native safety: build the CPU core with AddressSanitizer and UndefinedBehaviorSanitizer in a
# fresh virtual environment and run the native tests (the accumulator against numpy on
# awkward shapes, argument checks, and the fuzz test of random valid and corrupted calls)
# under them. Python itself is not instrumented, so the sanitizer runtimes are preloaded.
#
#   bash scripts/sanitize.sh
set -euo pipefail
cd "$(dirname "$0")/.."
venv="$(mktemp -d)/venv"
python3 -m venv "$venv"
. "$venv/bin/activate"
pip install -q torch==2.13.0 numpy pytest scikit-build-core pybind11 scipy-openblas32
pip install -q --no-build-isolation . \
    -Ccmake.define.PATHKERNEL_SANITIZE=ON -Ccmake.define.PATHKERNEL_CUDA=OFF \
    -Cbuild-dir=build/sanitize
export LD_PRELOAD="$(gcc -print-file-name=libasan.so):$(gcc -print-file-name=libubsan.so)"
# leaks: the interpreter and torch keep allocations until exit by design; everything else
# (out-of-bounds, use-after-free, undefined behaviour) aborts the run
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1:detect_odr_violation=0"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
cd tests
python -m pytest -q -p no:cacheprovider test_native.py
echo "sanitized native tests passed"

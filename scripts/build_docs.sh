#!/usr/bin/env bash
# The API reference, built from the docstrings of what `pathkernel` exports (its __all__):
# HTML into $1 (default build/docs). Any warning is an error: a docstring pdoc cannot read,
# a reference it cannot resolve. Needs pdoc: pip install ".[docs]".
set -euo pipefail
out="${1:-build/docs}"
python -W error -m pdoc --docformat google --output-directory "$out" pathkernel

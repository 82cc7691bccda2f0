#!/usr/bin/env bash
# The one prepared call for a lent GPU (see scripts/gpu_check.py for the sections and the results file):
#   bash scripts/gpu_check.sh            # on the device machine, from the repository root
# Installs proxytune in place first if it is not importable (no C++ op, no dependencies: the GPU image
# brings torch, triton and transformers), then runs the check with the same Python.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import proxytune.kernels' 2>/dev/null; then
  PROXYTUNE_NO_EXT=1 "$PYTHON" -m pip install -q --no-deps --no-build-isolation --no-index -e . || exit 1
fi
exec "$PYTHON" scripts/gpu_check.py "$@"

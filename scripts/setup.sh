#!/usr/bin/env bash
# Set-up for a fresh clone: installs torch if missing (the CPU wheel where there is no GPU), then
# proxytune in editable mode with its test extras, building the C++ extension against that torch.
# Installs into the current Python environment ($PYTHON, default python3): activate a venv first if you
# want one. A torch you already have is kept. Re-runs are skipped while nothing relevant changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

stamp=.setup-stamp
want=$( { command -v "$PYTHON"; "$PYTHON" -c 'import sys; print(sys.executable, sys.version)';
          cat pyproject.toml setup.py; if [ -d csrc ]; then find csrc -type f | sort | xargs -r cat; fi; } |
        sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$PYTHON" -c 'import proxytune' 2>/dev/null; then
  exit 0
fi

if "$PYTHON" -c 'import torch' 2>/dev/null; then
  echo "setup: keeping the installed torch $("$PYTHON" -c 'import torch; print(torch.__version__)')"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "setup: GPU found, installing torch (CUDA build)"
  "$PYTHON" -m pip install torch
else
  echo "setup: no GPU, installing the CPU build torch==${PROXYTUNE_CPU_TORCH:-2.13.0}"
  "$PYTHON" -m pip install "torch==${PROXYTUNE_CPU_TORCH:-2.13.0}"
fi

"$PYTHON" -m pip install --quiet "setuptools>=64" wheel
"$PYTHON" -m pip install --no-build-isolation -e ".[test]"
echo "$want" > "$stamp"

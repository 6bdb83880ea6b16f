#!/usr/bin/env bash
# The peers' environment for scripts/compare_peers.py: transformers generate and optimum's ORTModelForCausalLM.
# Separate from .venv because optimum-onnx 0.1.0 needs transformers < 4.58. torch pinned to the project's
# version and installed first, as scripts/setup.sh does. Run from anywhere: bash scripts/setup_peers.sh [VENV_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.venv-peers}"
PYTHON="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
"$VENV/bin/python" -m pip install -q "torch==2.13.0"  # first and pinned, as scripts/setup.sh does
"$VENV/bin/python" -m pip install -q "transformers>=4.56,<4.58" "optimum-onnx[onnxruntime]==0.1.0" numpy
"$VENV/bin/python" -c "import torch, transformers, optimum.onnxruntime, onnxruntime as ort; \
print('peers ready: torch', torch.__version__, '| transformers', transformers.__version__, '| onnxruntime', ort.__version__)"

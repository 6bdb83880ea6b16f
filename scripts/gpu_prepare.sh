#!/usr/bin/env bash
# Prepares onnxruntime-gpu for the lent GPU machine (no registry there): downloads the cp312 wheel here
# and splits it into pieces small enough for the device tool's 64 MiB carry limit. See docs/gpu.md.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.gpuwheel/' .git/info/exclude 2>/dev/null || echo /.gpuwheel/ >> .git/info/exclude
rm -rf .gpuwheel && mkdir -p .gpuwheel
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --platform manylinux_2_28_x86_64 -d .gpuwheel "onnxruntime-gpu==${ORT_GPU_VERSION:-1.31.1}"
cd .gpuwheel
split -b 55M onnxruntime_gpu-*.whl part.
i=1; for f in part.*; do mkdir -p "p$i"; mv "$f" "p$i/"; i=$((i + 1)); done
ls -R

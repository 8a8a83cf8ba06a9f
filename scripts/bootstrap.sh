#!/usr/bin/env bash
# Creates .venv and installs projectable-edge with its test extras, on a fresh machine.
# Where no NVIDIA GPU is present it installs the CPU build of torch first, so the
# loose `torch` requirement never drags in a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    .venv/bin/pip install -q torch
  else
    # the +cpu local version: from a local wheel cache when pip has one, else from PyTorch's CPU index
    TORCH_CPU="torch==${TORCH_CPU_VERSION:-2.13.0}+cpu"
    .venv/bin/pip install -q "$TORCH_CPU" 2>/dev/null \
      || .venv/bin/pip install -q "$TORCH_CPU" --extra-index-url https://download.pytorch.org/whl/cpu
  fi
fi
.venv/bin/pip install -q -e ".[dev]"

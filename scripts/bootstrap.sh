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
    # the +cpu local version: from a local wheel cache when pip has one, else from PyTorch's CPU index;
    # where neither has it for this Python, PyPI's build of the same version (larger, also runs on the CPU)
    TORCH_VERSION=${TORCH_CPU_VERSION:-2.13.0}
    .venv/bin/pip install -q "torch==$TORCH_VERSION+cpu" 2>/dev/null \
      || .venv/bin/pip install -q "torch==$TORCH_VERSION+cpu" --extra-index-url https://download.pytorch.org/whl/cpu \
         2>/dev/null \
      || { echo "bootstrap: no CPU build of torch $TORCH_VERSION for $(.venv/bin/python -V) here;" \
                "installing PyPI's torch==$TORCH_VERSION (several GB; it runs on the CPU too)" >&2
           .venv/bin/pip install -q "torch==$TORCH_VERSION"; }
  fi
fi
.venv/bin/pip install -q -e ".[dev]"

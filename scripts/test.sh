#!/usr/bin/env bash
# The test command: set up everything on a fresh machine, then run the whole suite on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/python -m pytest "$@"

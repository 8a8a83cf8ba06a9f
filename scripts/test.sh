#!/usr/bin/env bash
# The test command: set up everything on a fresh machine, check the layering
# (devices <- runtime <- exporters <- projectable_edge; contracts in pyproject.toml),
# then run the whole suite on the CPU (slow end-to-end tests included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
bash scripts/lint-imports.sh
exec .venv/bin/python -m pytest "$@"

#!/usr/bin/env bash
# Check the import contracts of pyproject.toml ([tool.importlinter]) on the installed module names.
#
# devices/ and exporters/ are mapped into packages by [tool.setuptools.package-dir]
# (projectable_edge_runtime.devices, projectable_edge.exporters), but grimp (import-linter's graph
# builder) only walks each root package's own folder. So this builds a throwaway mirror of the
# installed layout out of symlinks to the real files, and runs lint-imports on it.
# Usage: bash scripts/lint-imports.sh [lint-imports options]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
mirror=$(mktemp -d)
trap 'rm -rf "$mirror"' EXIT
"$PY" - "$mirror" <<'PYEOF'
import os, sys
from pathlib import Path
try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the host package depends on tomli there
    import tomli as tomllib

mirror = Path(sys.argv[1])
cfg = tomllib.loads(Path("pyproject.toml").read_text())["tool"]["setuptools"]
mapping = cfg.get("package-dir", {})
for pkg in cfg["packages"]:
    parts = pkg.split(".")
    # the package's folder: its own mapping, else its parent's folder + its last name
    src = next(Path(mapping[".".join(parts[:i])], *parts[i:]) for i in range(len(parts), 0, -1)
               if ".".join(parts[:i]) in mapping) if any(".".join(parts[:i]) in mapping
                                                         for i in range(len(parts), 0, -1)) else Path(*parts)
    dst = mirror.joinpath(*parts)
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.glob("*.py"):
        os.symlink(f.resolve(), dst / f.name)
PYEOF
cp pyproject.toml "$mirror/"
LINT="$(cd "$(dirname "$PY")" && pwd)/lint-imports"
(cd "$mirror" && PYTHONPATH="$mirror" "$LINT" --no-cache "$@")

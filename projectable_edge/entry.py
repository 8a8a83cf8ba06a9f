"""The `projectable-edge` console script: a one-line error, not a traceback, when host dependencies are missing.

(`pip install --no-deps projectable-edge` on a device gives the command without typer, rich or torch;
devices use the bundle's runtime wheel and `python -m projectable_edge_runtime` instead.)
"""
from __future__ import annotations

import atexit
import os
import sys


def main() -> None:
    try:
        from projectable_edge.cli import main as cli_main
    except ModuleNotFoundError as e:
        name = (e.name or "").split(".")[0]
        if not name or name.startswith("projectable_edge"):
            raise
        print(f"error: projectable-edge (the host toolchain) needs the package '{name}', which is not installed: "
              "pip install projectable-edge (with its dependencies). On a device, install the bundle's runtime "
              "wheel instead (pip install BUNDLE/runtime/*.whl) and run `python -m projectable_edge_runtime`.",
              file=sys.stderr)
        raise SystemExit(2) from None
    try:
        cli_main()
    except SystemExit as e:
        code = e.code
    else:
        code = 0
    if isinstance(code, str):
        print(code, file=sys.stderr)
    # Tearing down torch's and the exporter's objects at interpreter exit takes about a second and nothing
    # needs it: run the exit handlers (log flushing, temp-folder cleanup), flush, and leave.
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):  # a reader that went away, a closed stream, or none (None)
            pass
    os._exit(code if isinstance(code, int) else 0 if code is None else 1)


if __name__ == "__main__":
    main()

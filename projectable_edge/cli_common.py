"""Shared pieces of the CLI: the typer app, the error-handling decorator, JSON output.

Command modules (cli.py, cli_export.py, ...) import `app` and `command` from here and
register themselves; `projectable_edge.cli:main` imports them all.
"""

from __future__ import annotations

import functools
import json
import sys
import traceback

import typer
from rich.console import Console
from rich.markup import escape

from devices.errors import ProjectableEdgeError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Project a large task-conditioned Transformer into small task models and ship them to devices.")
_state = {"verbose": False}
err = Console(stderr=True)
out = Console()


@app.callback()
def _root(verbose: bool = typer.Option(False, "--verbose", "-v", help="Show tracebacks on errors.")):
    _state["verbose"] = verbose


def command(fn):
    """Register a command whose ProjectableEdgeError becomes a one-line message and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ProjectableEdgeError as e:
            if _state["verbose"]:
                traceback.print_exc()
            err.print("[bold red]error:[/] " + escape(str(e)), highlight=False)
            raise typer.Exit(2) from None

    return app.command()(wrapper)


def emit_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")

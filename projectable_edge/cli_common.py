"""Shared pieces of the host CLI: the app factory, the error boundary, consoles and choice enums.

Commands are plain functions in cli.py, cli_device.py and cli_export.py; `make_app` registers
the list it is given (explicit, no import side effects). The error boundary and the JSON and
table formatting are runtime.console's, the same as `python -m runtime`: a
ProjectableEdgeError prints one line and exits 2, anything else one line with a hint to rerun
with --verbose and exits 1; `--verbose` (before the command) adds the traceback.
"""

from __future__ import annotations

import functools

import click
import typer
from rich.console import Console
from rich.markup import escape

from devices.choices import StrEnum
from runtime.console import emit_json, error_boundary

__all__ = ["choice_enum", "emit_json", "err", "make_app", "out"]

_state = {"verbose": False}
err = Console(stderr=True)
out = Console()
_PASSTHROUGH = (click.exceptions.Exit, click.exceptions.Abort, click.exceptions.ClickException)


def choice_enum(name: str, words) -> type[StrEnum]:
    """A typer choice type from a registry's words (typer lists them in --help and rejects others)."""
    return StrEnum(name, [(w.upper().replace("-", "_"), w) for w in words])


def _say(line: str) -> None:
    err.print("[bold red]error:[/] " + escape(line.removeprefix("error: ")), highlight=False)


def guarded(fn):
    """Run a command inside the shared error boundary; its exit code becomes the process's."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        code = error_boundary(lambda: fn(*args, **kwargs), verbose=_state["verbose"], say=_say,
                              passthrough=_PASSTHROUGH)
        if code:
            raise typer.Exit(code)

    return wrapper


def _root(verbose: bool = typer.Option(False, "--verbose", "-v", help="Show tracebacks on errors.")):
    _state["verbose"] = verbose


def make_app(commands) -> typer.Typer:
    """The `projectable-edge` app with exactly these commands, in this order."""
    app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                      help="Project a large task-conditioned Transformer into small task models and ship them "
                           "to devices.")
    app.callback()(_root)
    for fn in commands:
        app.command()(guarded(fn))
    return app

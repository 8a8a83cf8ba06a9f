"""Shared pieces of the host CLI: the app factory, the error boundary, consoles and choice enums.

Commands are plain functions in cli.py, cli_device.py and cli_export.py; `make_app` registers
the list it is given (explicit, no import side effects). The error boundary and the JSON and
table formatting are runtime.console's, the same as `python -m projectable_edge_runtime`: a
ProjectableEdgeError prints one line and exits 2, anything else one line with a hint to rerun
with --verbose and exits 1; `--verbose` (before the command) adds the traceback.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import click
import typer
from rich.console import Console
from rich.markup import escape
from rich.segment import Segments

from projectable_edge_runtime.bundle.atomic import probe_writable
from projectable_edge_runtime.devices.choices import StrEnum
from projectable_edge_runtime.commands.console import check_png, cli_signals, emit_json, error_boundary, fail, \
    take_verbose, wants_json

__all__ = ["check_out_writable", "check_png", "choice_enum", "emit_json", "err", "make_app", "out", "run_app", "show"]

_state = {"verbose": False, "json": False}  # json: --json was asked for (errors then also go to stdout as JSON)
# COLUMNS=0 (a terminal that reports no size: some CI runners and containers) makes rich draw 0 columns wide, so
# errors and --help printed nothing at all; it is taken as unset, as rich takes a 0 from the terminal itself
if os.environ.get("COLUMNS", "1").strip("0") == "":
    del os.environ["COLUMNS"]


class _Stdout(Console):
    def on_broken_pipe(self) -> None:  # rich exits with 1; the error boundary ends `... | head` quietly, with 0
        raise BrokenPipeError


# messages and log lines stay one line each, whatever the width; markup is off by default: paths and names may
# hold brackets ('runs/[v2]'), which rich would take for styles (and drop) or fail on ('[/]')
err = Console(stderr=True, soft_wrap=True, markup=False)
out = _Stdout(soft_wrap=True, markup=False)
_PASSTHROUGH = (click.exceptions.Exit, typer.Exit, click.exceptions.Abort, click.exceptions.ClickException)


def choice_enum(name: str, words) -> type[StrEnum]:
    """A typer choice type from a registry's words (typer lists them in --help and rejects others)."""
    return StrEnum(name, [(w.upper().replace("-", "_"), w) for w in words])


def show(table) -> None:
    """Print a table whole, at its natural width: rich fits a table to the console (80 columns when stdout is a
    pipe or a file) by cropping its cells ('32x4/int…'), down to empty cells in a narrow terminal."""
    natural = out.measure(table, options=out.options.update_width(1 << 16)).maximum
    out.print(Segments(out.render(table, out.options.update_width(max(natural, out.width)))))


def _say(line: str) -> None:
    err.print("[bold red]error:[/] " + escape(line.removeprefix("error: ")), markup=True, highlight=False)


def guarded(fn):
    """Run a command inside the shared error boundary; its exit code becomes the process's."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        code = error_boundary(lambda: fn(*args, **kwargs), verbose=_state["verbose"], say=_say,
                              passthrough=_PASSTHROUGH, json_errors=_state["json"])
        if code:
            raise typer.Exit(code)

    return wrapper


def check_out_writable(path, what: str = "--out", *, inside: bool = False) -> None:
    """Fail before any work when `path` (inside: a file in the folder `path`) cannot be created: the nearest
    existing parent must be a folder this user can write. Creates nothing (the probe is removed at once)."""
    from projectable_edge_runtime.devices.errors import ProjectableEdgeError

    target = Path(path).expanduser().absolute()
    parent = target if inside else target.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ProjectableEdgeError(f"cannot write {what} '{path}': '{parent}' is a file, not a folder; "
                                   f"choose another {what}")
    try:
        if not os.access(parent, os.W_OK | os.X_OK):
            raise PermissionError(f"no write permission on '{parent}'")
        probe_writable(parent)
    except OSError as e:
        raise ProjectableEdgeError(f"cannot write {what} '{path}': the folder '{parent}' is not writable by this "
                                   f"user ({e.strerror or e}); choose another {what} or fix the folder's "
                                   "permissions") from None


def _root(verbose: bool = typer.Option(False, "--verbose", "-v", help="Show tracebacks on errors.")):
    _state["verbose"] = verbose


# click's errors, or typer's copy of them (typer >= 0.2x vendors click; its TyperException is their base)
_CLICK_ERRORS = (getattr(typer, "TyperException", click.ClickException), click.ClickException)
_ABORTS = (typer.Abort, click.Abort)  # end of input at a prompt: typer's own, or click's in older typers


def run_app(app: typer.Typer, argv: list[str]) -> int:
    """The console script's run of `app`: --verbose before or after the command, SIGTERM as Ctrl-C, and usage
    errors in one line like every other error (click draws them as a box of five); the exit code."""
    cli_signals()
    argv, verbose = take_verbose(argv)
    _state["json"] = wants_json(argv)
    empty = next((i for i, a in enumerate(argv) if a == "" or a.startswith("--") and a.endswith("=")), None)
    if empty is not None:  # never a valid value; click reads an empty path as the current folder (--cache-dir "")
        a = argv[empty]
        what = f"{a} has an empty value" if a else "an empty argument" + (f" after {argv[empty - 1]}" if empty else "")
        return fail(f"{what} (an unset shell variable?): give it a value, or leave the option out "
                    "(see 'projectable-edge --help')", 2, _state["json"], _say)
    try:
        code = app(args=["--verbose"] * verbose + (argv or ["--help"]), prog_name="projectable-edge",
                   standalone_mode=False)
    except _ABORTS:
        return fail("interrupted", 130, _state["json"], _say)
    except _CLICK_ERRORS as e:
        ctx = getattr(e, "ctx", None)  # a usage error: an unknown option or command, a bad or missing value
        return fail(f"{e.format_message()} (see '{ctx.command_path if ctx else 'projectable-edge'} --help')",
                    e.exit_code, _state["json"], _say)
    return code if isinstance(code, int) else 0


def make_app(commands) -> typer.Typer:
    """The `projectable-edge` app with exactly these commands, in this order."""
    app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                      help="Project a large task-conditioned Transformer into small task models and ship them "
                           "to devices.")
    app.callback()(_root)
    for fn in commands:
        app.command()(guarded(fn))
    return app

"""Atomic outputs: write into a temp sibling, rename into place only when complete.

A crash or a failed check part-way leaves nothing behind at the destination, and an
existing output is never clobbered unless the caller says so (overwrite=True).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from devices.errors import ProjectableEdgeError


def _umask_mode(mode: int) -> int:
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


def _refuse_existing(path: Path, overwrite: bool, what: str) -> None:
    if path.exists() and not overwrite:
        raise ProjectableEdgeError(f"output {what} {path} already exists; choose another path, "
                                   f"delete it, or pass overwrite=True (--overwrite)")
    if path.exists() and what == "folder" and not path.is_dir():
        raise ProjectableEdgeError(f"output folder {path} exists and is a file; choose another path")


@contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp folder next to `path`; on success it becomes `path` (old one removed last)."""
    path = Path(path)
    _refuse_existing(path, overwrite, "folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    os.chmod(tmp, _umask_mode(0o777))  # mkdtemp makes 0700; a finished output gets normal permissions
    try:
        yield tmp
        if path.exists():  # overwrite: move the old one aside, swap, then delete it
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, old / "x")
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def atomic_file(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp file path next to `path` (same suffix); on success it replaces `path`."""
    path = Path(path)
    _refuse_existing(path, overwrite, "file")
    if path.is_dir():
        raise ProjectableEdgeError(f"output file {path} is a folder; give a file path")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.stem}.tmp-", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, _umask_mode(0o666))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()

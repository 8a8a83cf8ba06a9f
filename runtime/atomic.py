"""The one atomic-write helper: build an output in a temp sibling, rename it into place when complete.

A crash or a failed check part-way leaves nothing at the destination and no temp leftovers;
an existing output is never clobbered unless the caller says so; finished outputs get the
usual permissions (0644 files, 0755 folders under a 022 umask), not mkstemp's private 0600.
Stdlib only, in the runtime, so every layer above (exporters, checkpoints, bundles) uses it.
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


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextmanager
def atomic_output(path: str | os.PathLike, *, directory: bool = False, overwrite: bool = False,
                  what: str | None = None) -> Iterator[Path]:
    """Yield a temp file (or folder) path beside `path`; on success it becomes `path`.

    With overwrite=True an existing output is replaced: moved aside, swapped, then deleted,
    and put back if the swap fails. `what` names the output in errors ("bundle", "output folder").
    """
    path = Path(path)
    what = what or ("output folder" if directory else "output file")
    if path.exists() and not overwrite:
        raise ProjectableEdgeError(f"{what} {path} already exists; choose another path, delete it, "
                                   "or pass overwrite=True (--overwrite)")
    if path.exists() and path.is_dir() != directory:
        raise ProjectableEdgeError(f"{what} {path} exists and is a {'file' if directory else 'folder'}; "
                                   "choose another path")
    path.parent.mkdir(parents=True, exist_ok=True)
    if directory:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=f".{path.stem}.tmp-", suffix=path.suffix, dir=path.parent)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, _umask_mode(0o777 if directory else 0o666))
        _swap(tmp, path, what)
    finally:
        if tmp.exists():
            _remove(tmp)


def _swap(tmp: Path, path: Path, what: str) -> None:
    if not path.is_dir():  # nothing there, or a file: one atomic rename
        os.replace(tmp, path)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
    try:
        os.replace(path, old / "x")
        try:
            os.replace(tmp, path)
        except BaseException:
            os.replace(old / "x", path)
            raise
    except FileNotFoundError:
        raise ProjectableEdgeError(f"{what} {path} changed while it was being written; try again") from None
    finally:
        shutil.rmtree(old, ignore_errors=True)

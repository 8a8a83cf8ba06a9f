"""The one atomic-write helper: build an output in a temp sibling, rename it into place when complete, so a
crash or a failed check leaves nothing behind. Outputs get modes 0755/0644, not the umask's: an app or service
account running as another user must read bundles, PNGs, run folders and reports.
"""
from __future__ import annotations

import errno
import os
import shutil
import tempfile
import threading
from contextlib import contextmanager
from itertools import takewhile
from pathlib import Path
from typing import Iterator

from ..devices.errors import ProjectableEdgeError

DIR_MODE, FILE_MODE, EXEC_MODE = 0o755, 0o644, 0o755


# Set by a CLI's Ctrl-C / SIGTERM handler (commands.console.cli_signals) as it raises KeyboardInterrupt: some
# libraries catch that and go on (torch.onnx tries its next export strategy; an exception in an at-fork hook is
# printed and dropped), so the interrupt is also remembered here.
INTERRUPTED = threading.Event()


def _publish(path: Path) -> None:
    """Make a finished output readable by every user: folders 0755, files 0644 (0755 if executable)."""
    for p in [path, *(Path(root, n) for root, dirs, files in os.walk(path) for n in dirs + files)]:
        if not p.is_symlink():
            os.chmod(p, DIR_MODE if p.is_dir() else EXEC_MODE if p.stat().st_mode & 0o111 else FILE_MODE)


def _make_parents(folder: Path) -> list[Path]:
    """mkdir -p `folder`; return the folders this created, deepest first (to undo on failure)."""
    created = list(takewhile(lambda p: not p.exists(), [folder, *folder.parents]))
    for d in reversed(created):
        try:
            d.mkdir()
            os.chmod(d, DIR_MODE)
        except FileExistsError:
            pass
        except OSError as e:
            raise ProjectableEdgeError(f"cannot create folder {d} ({e.strerror}); choose another path") from None
    return created


def probe_writable(folder: str | os.PathLike) -> None:
    """Create and remove a temp folder in `folder`: OSError where this user cannot write there (os.access alone is
    wrong for root and some mounts)."""
    tempfile.TemporaryDirectory(dir=folder, prefix=".pe-write-probe-").cleanup()


def ensure_folder(path: str | os.PathLike) -> Path:
    """mkdir -p with world-readable (0755) folders whatever the umask; for folders filled in place."""
    _make_parents(Path(path))
    return Path(path)


@contextmanager
def atomic_output(path: str | os.PathLike, *, directory: bool = False, overwrite: bool = False,
                  what: str | None = None, mark: str | None = None,
                  flag: str = "--overwrite (overwrite=True in Python)") -> Iterator[Path]:
    """Yield a temp file (or folder) beside `path` that becomes `path` on success; an existing output is replaced
    only with overwrite=True (and put back if the swap fails). `what` names the output, `flag` the option that replaces it, in errors. `mark`: the file
    that every output folder of this kind holds; an existing folder without it is not replaced unless empty (it
    is not an earlier output, and replacing it would delete its files)."""
    path = Path(path)
    what = what or ("output folder" if directory else "output file")
    if path.exists() and not overwrite:
        raise ProjectableEdgeError(f"{what} {path} already exists; choose another path, delete it, "
                                   f"or pass {flag}")
    if path.exists() and path.is_dir() != directory:
        raise ProjectableEdgeError(f"{what} {path} exists and is a {'file' if directory else 'folder'}; "
                                   "choose another path")
    if mark and path.is_dir() and not (path / mark).is_file() and any(path.iterdir()):
        raise ProjectableEdgeError(f"{path} is not a {what} (it has no {mark}), so it is not replaced: its files "
                                   "would be deleted; choose another path, or move that folder away yourself")
    created = _make_parents(path.parent)
    ok = False
    try:
        try:
            if directory:
                tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
            else:
                fd, name = tempfile.mkstemp(prefix=f".{path.stem}.tmp-", suffix=path.suffix, dir=path.parent)
                os.close(fd)
                tmp = Path(name)
        except OSError as e:  # a read-only or special folder (/proc, /sys), no permission, a full disk
            fix = ("choose a shorter name (the temporary name beside it is the name + 14 characters)"
                   if e.errno == errno.ENAMETOOLONG else "choose a folder you can write to")
            raise ProjectableEdgeError(f"cannot write the {what} {path} ({e.strerror or e}); {fix}") from None
        try:
            yield tmp
            if INTERRUPTED.is_set():  # an interrupt that a library caught and dropped still publishes nothing
                raise KeyboardInterrupt
            _publish(tmp)
            _swap(tmp, path, what, overwrite, flag)
            ok = True
        except OSError as e:
            if e.filename is None:  # a failed write (a full disk) names no file: name the output
                e.filename = str(path)
            raise
        finally:
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)
    finally:
        for d in [] if ok else created:  # deepest first, while still empty
            try:
                d.rmdir()
            except OSError:
                break


def _swap(tmp: Path, path: Path, what: str, overwrite: bool, flag: str) -> None:
    if not overwrite and tmp.is_dir():  # rename refuses a folder that appeared meanwhile (another process's output)
        try:
            os.rename(tmp, path)
        except OSError as e:
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR):
                raise
            raise ProjectableEdgeError(f"{what} {path} was created by another process while this one was writing "
                                       f"it; choose another path, or pass {flag}") from None
        return
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

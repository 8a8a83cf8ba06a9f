"""Content-addressed cache of step outputs (Olive's idea): a step's key hashes everything its output depends
on (input hashes, settings, tool versions), so another target for the same task copies the built graphs."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

from projectable_edge_runtime.bundle.atomic import atomic_output
from projectable_edge_runtime.bundle.manifest import sha256_file
from projectable_edge_runtime.devices.errors import ProjectableEdgeError

SCHEMA = 1  # bump when a step's outputs change meaning
RESULT = "result.json"


def content_key(**parts) -> str:
    return hashlib.sha256(json.dumps({"schema": SCHEMA, **parts}, sort_keys=True, default=str).encode()).hexdigest()


def _copy(files: list[str], src: Path, dest: Path) -> None:
    for rel in files:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / rel, dest / rel)


def _read(entry: Path) -> dict | None:
    """The entry's result; None (a miss: built and written anew) where it is missing or damaged (a file gone,
    truncated or edited: each must still have the sha256 recorded when the entry was written)."""
    try:
        result = json.loads((entry / RESULT).read_text())
        if (isinstance(result, dict) and isinstance(result.get("seconds"), (int, float))
                and isinstance(result.get("files"), list) and isinstance(result.get("sha256"), dict)
                and all(result["sha256"].get(f) == sha256_file(entry / f) for f in result["files"])):
            return result
    except (OSError, ValueError, TypeError, RecursionError):
        pass
    return None


class StepCache:
    """<root>/<step>/<key>/{files..., result.json}, each entry written atomically; root None = caching off."""

    def __init__(self, root: Path | None):
        self.root = Path(root) if root else None
        self.hits: list[str] = []
        self.misses: list[str] = []
        self.saved_seconds = 0.0

    def run(self, step: str, key: str, dest: Path, build, log=None, reused: str = "") -> dict:
        """The cached result with its files copied into dest, else build()'s (its "files" relative to dest),
        stored with the seconds it took; `reused`, when given, is logged on a hit."""
        entry = self.root / step / key if self.root else None
        result = _read(entry) if entry is not None else None
        if result is not None:
            self.hits.append(step)
            self.saved_seconds += result["seconds"]
            if reused:
                log(f"{reused} (saved {result['seconds']:.1f}s)")
            _copy(result["files"], entry, dest)
            return result
        self.misses.append(step)
        start = time.perf_counter()
        result = build()
        result["seconds"] = time.perf_counter() - start
        result["sha256"] = {f: sha256_file(dest / f) for f in result["files"]}
        if entry is not None:
            try:
                with atomic_output(entry, directory=True, overwrite=entry.exists(), what="cache entry") as tmp:
                    _copy(result["files"], dest, tmp)
                    (tmp / RESULT).write_text(json.dumps(result, indent=2, default=str))
            except (ProjectableEdgeError, OSError):
                if _read(entry) is None:  # else another generate sharing the cache wrote this entry meanwhile
                    raise
        return result

    def summary(self) -> dict:
        return {"dir": str(self.root) if self.root else None, "hits": self.hits, "misses": self.misses,
                "saved_seconds": self.saved_seconds}

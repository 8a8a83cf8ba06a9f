"""Content-addressed cache of pipeline step outputs (Olive's idea): a step's key hashes everything its
output depends on (input hashes, settings, tool versions), so another target for the same task copies the
export and quantized graphs instead of rebuilding them. Entries are written atomically.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from projectable_edge_runtime.bundle.atomic import atomic_output

SCHEMA = 1  # bump when a step's outputs change meaning
RESULT = "result.json"


def content_key(**parts) -> str:
    return hashlib.sha256(json.dumps({"schema": SCHEMA, **parts}, sort_keys=True, default=str).encode()).hexdigest()


class StepCache:
    """<root>/<step>/<key>/{files..., result.json}; root None = caching off."""

    def __init__(self, root: Path | None):
        self.root = Path(root) if root else None
        self.hits: list[str] = []
        self.misses: list[str] = []
        self.saved_seconds = 0.0

    def fetch(self, step: str, key: str, dest: Path) -> dict | None:
        """Copy a cached entry's files into dest and return its result, or None on a miss."""
        entry = self.root / step / key if self.root else None
        if entry is None or not (entry / RESULT).is_file():
            self.misses.append(step)
            return None
        result = json.loads((entry / RESULT).read_text())
        for rel in result["files"]:
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(entry / rel, dest / rel)
        self.hits.append(step)
        self.saved_seconds += float(result.get("seconds", 0.0))
        return result

    def store(self, step: str, key: str, src: Path, result: dict) -> None:
        """Keep result["files"] (relative to src) and the result under the key."""
        if self.root is None:
            return
        with atomic_output(self.root / step / key, directory=True, overwrite=True, what="cache entry") as tmp:
            for rel in result["files"]:
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src / rel, tmp / rel)
            (tmp / RESULT).write_text(json.dumps(result, indent=2, default=str))

    def summary(self) -> dict:
        return {"dir": str(self.root) if self.root else None, "hits": self.hits, "misses": self.misses,
                "saved_seconds": self.saved_seconds}

"""The runtime-only wheel every bundle carries (built by `pip wheel` from the installed runtime's modules, with
SOURCE_DATE_EPOCH fixed so the same sources give the same bytes), and the manifest's `requires` field."""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import onnx

from projectable_edge import __version__
from projectable_edge.pipeline.cache import StepCache, content_key
from projectable_edge_runtime.devices.errors import ProjectableEdgeError
from projectable_edge_runtime.bundle.requirements import MIN_NUMPY, MIN_ONNXRUNTIME, MIN_PYTHON, requires_for
from projectable_edge_runtime.bundle.manifest import Requires, Wheel
from projectable_edge_runtime.commands.serve import SERVE_REQUIRES

DIST = "projectable-edge-runtime"
WHEEL = f"runtime/{DIST.replace('-', '_')}-{__version__}-py3-none-any.whl"  # its path in the bundle
PACKAGES = tuple(f"projectable_edge_runtime{sub}" for sub in ("", ".bundle", ".graphs", ".commands", ".devices"))

_PYPROJECT = """\
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "{dist}"
version = "{version}"
description = "Torch-free runtime for projectable-edge bundles (numpy + onnxruntime only)."
requires-python = ">={python}"
license = {{ text = "Apache-2.0" }}
dependencies = ["numpy>={numpy}", "onnxruntime>={ort}"]

[project.optional-dependencies]
images = ["pillow>=10"]
serve = ["{serve}"]

[project.scripts]
projectable-edge-runtime = "projectable_edge_runtime.__main__:main"

[tool.setuptools]
packages = {packages}
"""


def _sources() -> dict[str, Path]:
    """{path inside the wheel's source tree: file} for the installed runtime's modules (never caches or TOML)."""
    return {f"{pkg.replace('.', '/')}/{f.name}": f for pkg in PACKAGES
            for f in sorted(Path(importlib.import_module(pkg).__file__).resolve().parent.glob("*.py"))}


def _build(sources: dict[str, Path], bundle: Path, log) -> dict:
    with tempfile.TemporaryDirectory(prefix="pe-wheel-") as tmp:
        proj = Path(tmp)
        for rel, f in sources.items():
            dst = proj / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, dst)
            os.chmod(dst, 0o644)
        (proj / "pyproject.toml").write_text(_PYPROJECT.format(
            dist=DIST, version=__version__, python=MIN_PYTHON, numpy=MIN_NUMPY, ort=MIN_ONNXRUNTIME,
            serve=SERVE_REQUIRES, packages=json.dumps(PACKAGES)))
        env = dict(os.environ, SOURCE_DATE_EPOCH="315532800", PIP_DISABLE_PIP_VERSION_CHECK="1")
        cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
               "-q", "-w", str((bundle / WHEEL).parent), str(proj)]
        log(f"building the runtime wheel {Path(WHEEL).name} (pip wheel)")
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp)
        if res.returncode != 0 or not (bundle / WHEEL).is_file():
            raise ProjectableEdgeError("building the runtime wheel failed (needs pip and setuptools>=68 in this "
                                       f"environment): {(res.stderr or res.stdout).strip()[-800:]}")
    return {"files": [WHEEL]}


def write_runtime_wheel(bundle: Path, cache: StepCache, log) -> Wheel:
    """Put the runtime wheel into `bundle`/runtime/ (the step cache's, when the same sources built one);
    return the manifest's `runtime_wheel` field."""
    sources = _sources()
    h = hashlib.sha256(f"{__version__} {SERVE_REQUIRES}".encode())
    for rel, f in sources.items():
        h.update(rel.encode() + b"\0" + f.read_bytes() + b"\0")
    cache.run("wheel", content_key(step="wheel", sources=h.hexdigest()), bundle, lambda: _build(sources, bundle, log))
    return Wheel(WHEEL, DIST, __version__, "projectable_edge_runtime",
                 (f"numpy>={MIN_NUMPY}", f"onnxruntime>={MIN_ONNXRUNTIME}"),
                 {"images": ("pillow>=10",), "serve": (SERVE_REQUIRES,)},
                 f"python3 -m venv pe && pe/bin/pip install {WHEEL}",
                 "pe/bin/python -m projectable_edge_runtime validate .")


def graph_requires(bundle: Path, graph_files: list[str]) -> Requires:
    """The manifest's `requires`: the runtime's floors, plus the graphs' IR version and opsets."""
    ir, opsets = 0, {}
    for rel in graph_files:
        m = onnx.load(str(bundle / rel), load_external_data=False)
        ir = max(ir, int(m.ir_version))
        for o in m.opset_import:
            dom = o.domain or "ai.onnx"
            opsets[dom] = max(opsets.get(dom, 0), int(o.version))
    return requires_for(ir or None, opsets)

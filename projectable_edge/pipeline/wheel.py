"""The runtime-only wheel every bundle carries (written from the installed runtime's modules; the same sources
give the same bytes), and the manifest's `requires` field."""

from __future__ import annotations

import base64
import hashlib
import importlib
import zipfile
from pathlib import Path

import onnx

from projectable_edge import __version__
from projectable_edge.pipeline.cache import StepCache, content_key
from projectable_edge_runtime.bundle.requirements import MIN_NUMPY, MIN_ONNXRUNTIME, MIN_PYTHON, requires_for
from projectable_edge_runtime.bundle.manifest import Requires, Wheel
from projectable_edge_runtime.commands.serve import SERVE_REQUIRES

DIST = "projectable-edge-runtime"
WHEEL = f"runtime/{DIST.replace('-', '_')}-{__version__}-py3-none-any.whl"  # its path in the bundle
PACKAGES = tuple(f"projectable_edge_runtime{sub}" for sub in ("", ".bundle", ".graphs", ".commands", ".devices"))

def _sources() -> dict[str, Path]:
    """{path inside the wheel's source tree: file} for the installed runtime's modules (never caches or TOML)."""
    return {f"{pkg.replace('.', '/')}/{f.name}": f for pkg in PACKAGES
            for f in sorted(Path(importlib.import_module(pkg).__file__).resolve().parent.glob("*.py"))}


def _metadata() -> dict[str, str]:
    """The dist-info files pip reads to install and check the wheel (core metadata 2.1, PEP 427)."""
    extras = {"images": "pillow>=10", "serve": SERVE_REQUIRES}
    meta = [f"Metadata-Version: 2.1\nName: {DIST}\nVersion: {__version__}\n"
            "Summary: Torch-free runtime for projectable-edge bundles (numpy + onnxruntime only).\n"
            f"License: Apache-2.0\nRequires-Python: >={MIN_PYTHON}\n"
            f"Requires-Dist: numpy>={MIN_NUMPY}\nRequires-Dist: onnxruntime>={MIN_ONNXRUNTIME}\n"]
    meta += [f'Provides-Extra: {x}\nRequires-Dist: {req}; extra == "{x}"\n' for x, req in extras.items()]
    return {"METADATA": "".join(meta),
            "WHEEL": "Wheel-Version: 1.0\nGenerator: projectable-edge\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
            "entry_points.txt": "[console_scripts]\nprojectable-edge-runtime = projectable_edge_runtime.__main__:main\n",
            "top_level.txt": "projectable_edge_runtime\n"}


def _build(sources: dict[str, Path], bundle: Path, log) -> dict:
    """Write the wheel directly: a zip of the modules and a RECORD of every file's hash, with fixed timestamps
    (the same sources give the same bytes); no build backend, no subprocess."""
    log(f"writing the runtime wheel {Path(WHEEL).name}")
    info = f"{DIST.replace('-', '_')}-{__version__}.dist-info"
    files = {rel: f.read_bytes() for rel, f in sources.items()}
    files.update({f"{info}/{name}": text.encode() for name, text in _metadata().items()})
    digest = {rel: base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
              for rel, data in files.items()}
    files[f"{info}/RECORD"] = "".join([*(f"{rel},sha256={digest[rel]},{len(data)}\n" for rel, data in files.items()),
                                       f"{info}/RECORD,,\n"]).encode()
    (bundle / WHEEL).parent.mkdir(exist_ok=True)
    with zipfile.ZipFile(bundle / WHEEL, "w") as whl:
        for rel, data in files.items():
            entry = zipfile.ZipInfo(rel, date_time=(1980, 1, 1, 0, 0, 0))
            entry.external_attr, entry.compress_type = 0o644 << 16, zipfile.ZIP_DEFLATED
            whl.writestr(entry, data)
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

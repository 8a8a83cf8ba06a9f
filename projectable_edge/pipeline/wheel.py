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
DIST_INFO = f"{DIST.replace('-', '_')}-{__version__}.dist-info"
WHEEL = f"runtime/{DIST.replace('-', '_')}-{__version__}-py3-none-any.whl"  # its path in the bundle
PACKAGES = tuple(f"projectable_edge_runtime{sub}" for sub in ("", ".bundle", ".graphs", ".commands", ".devices"))
REQUIRES = (f"numpy>={MIN_NUMPY}", f"onnxruntime>={MIN_ONNXRUNTIME}")
EXTRAS = {"images": ("pillow>=10",), "serve": (SERVE_REQUIRES,)}


def _metadata() -> dict[str, str]:
    """The dist-info files pip reads to install and check the wheel (core metadata 2.1, PEP 427)."""
    meta = [f"Metadata-Version: 2.1\nName: {DIST}\nVersion: {__version__}\n"
            "Summary: Torch-free runtime for projectable-edge bundles (numpy + onnxruntime only).\n"
            f"License: Apache-2.0\nRequires-Python: >={MIN_PYTHON}\n", *(f"Requires-Dist: {r}\n" for r in REQUIRES)]
    meta += [f'Provides-Extra: {x}\n' + "".join(f'Requires-Dist: {r}; extra == "{x}"\n' for r in reqs)
             for x, reqs in EXTRAS.items()]
    return {"METADATA": "".join(meta),
            "WHEEL": "Wheel-Version: 1.0\nGenerator: projectable-edge\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
            "entry_points.txt": "[console_scripts]\nprojectable-edge-runtime = projectable_edge_runtime.__main__:main\n",
            "top_level.txt": "projectable_edge_runtime\n"}


def _build(files: dict[str, bytes], bundle: Path, log) -> dict:
    """Write the wheel directly: a zip of its files with fixed timestamps (the same files give the same bytes);
    no build backend, no subprocess."""
    log(f"writing the runtime wheel {Path(WHEEL).name}")
    (bundle / WHEEL).parent.mkdir(exist_ok=True)
    with zipfile.ZipFile(bundle / WHEEL, "w") as whl:
        for rel, data in files.items():
            entry = zipfile.ZipInfo(rel, date_time=(1980, 1, 1, 0, 0, 0))
            entry.external_attr, entry.compress_type = 0o644 << 16, zipfile.ZIP_DEFLATED
            whl.writestr(entry, data)
    return {"files": [WHEEL]}


def write_runtime_wheel(bundle: Path, cache: StepCache, log) -> Wheel:
    """Put the runtime wheel (the installed runtime's modules, never caches or TOML, and its dist-info) into
    `bundle`/runtime/; return the manifest's `runtime_wheel` field. Its RECORD is the step cache's key."""
    files = {f"{pkg.replace('.', '/')}/{f.name}": f.read_bytes() for pkg in PACKAGES
             for f in sorted(Path(importlib.import_module(pkg).__file__).resolve().parent.glob("*.py"))}
    files.update({f"{DIST_INFO}/{name}": text.encode() for name, text in _metadata().items()})
    digest = {rel: base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
              for rel, data in files.items()}
    record = "".join([*(f"{rel},sha256={digest[rel]},{len(data)}\n" for rel, data in files.items()),
                      f"{DIST_INFO}/RECORD,,\n"])
    files[f"{DIST_INFO}/RECORD"] = record.encode()
    cache.run("wheel", content_key(step="wheel", record=record), bundle, lambda: _build(files, bundle, log))
    return Wheel(WHEEL, DIST, __version__, "projectable_edge_runtime", REQUIRES, EXTRAS,
                 f"python3 -m venv ../pe && ../pe/bin/pip install {WHEEL}",  # in the bundle: the venv beside it
                 "../pe/bin/python -m projectable_edge_runtime validate .")


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

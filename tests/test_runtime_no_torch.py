"""The runtime must run on a device with no torch: proven in a fresh interpreter that cannot import it."""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# A meta-path finder that makes torch (and the torch-based packages) unimportable and records
# every attempt, so a runtime that tried torch inside a try/except would still be caught.
_SCRIPT = r"""
import importlib.abc, json, sys
BLOCKED = ("torch", "projectable_edge", "exporters", "torchvision", "onnx", "onnxscript")
attempts = []
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            attempts.append(name)
            raise ImportError(f"{name} is blocked: the runtime must not need it")
        return None
sys.meta_path.insert(0, Block())

import numpy as np
import projectable_edge_runtime as runtime
from projectable_edge_runtime.__main__ import main

bundle = sys.argv[1]
model = runtime.load(bundle)
v = runtime.validate(model)
g = np.load(f"{bundle}/goldens.npz", allow_pickle=False)["tokens"]
bits = model.score(model.decode_images(g[:3]))
toks = model.sample(2, seed=0)
b = runtime.benchmark(model, runs=3, warmup=0, batch=2, sample_runs=2)
cli = main(["validate", bundle, "--json"])
print("RESULT" + json.dumps({
    "verdict": v["verdict"], "bits": bits.tolist(), "sample_shape": list(toks.shape),
    "bench_verdict": b["verdict"], "bench_checks": [c["passed"] for c in b["checks"]], "cli": cli, "attempts": attempts,
    "loaded": sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)}))
"""


def test_runtime_runs_without_torch(rt_bundle):
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, str(rt_bundle)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT"))
    r = json.loads(line[len("RESULT"):])
    assert r["attempts"] == [] and r["loaded"] == []
    assert r["verdict"] == "pass" and r["cli"] == 0
    assert len(r["bits"]) == 3 and all(0 < x < 20 for x in r["bits"])
    assert r["sample_shape"] == [2, 64] and len(r["bench_checks"]) == 2
    assert r["bench_verdict"] == ("pass" if all(r["bench_checks"]) else "fail")


def test_blocker_really_blocks_torch():
    """Guard the guard: the same finder must make `import torch` fail."""
    script = _SCRIPT.split("import numpy as np")[0]
    script += "\ntry:\n    import torch\nexcept ImportError:\n    print('BLOCKED')\n"
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "BLOCKED", proc.stderr


ALLOWED_TOP = {"numpy", "onnxruntime"}  # the runtime's own modules import each other relatively
# optional, imported inside the function that needs them; tomllib (3.11's stdlib) or tomli: TOML on the host only
ALLOWED_LAZY = ALLOWED_TOP | {"tensorrt", "PIL", "tomllib", "tomli", "cryptography", "waitress"}


def test_runtime_imports_only_stdlib_numpy_onnxruntime():
    """Static check of every runtime module: heavy optional deps only inside functions."""
    bad = []
    for path in sorted([*(ROOT / "runtime").rglob("*.py"), *(ROOT / "devices").glob("*.py")]):
        tree = ast.parse(path.read_text())
        top_level = {id(n) for n in tree.body} | {id(c) for n in tree.body if isinstance(n, ast.Try)
                                                  for c in n.body + [h for x in n.handlers for h in x.body]}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            allowed = ALLOWED_TOP if id(node) in top_level else ALLOWED_LAZY
            for name in names:
                root = name.split(".")[0]
                if root not in sys.stdlib_module_names and root not in allowed:
                    bad.append(f"{path.name}:{node.lineno} imports {name}")
    assert bad == []


def test_onnxruntime_telemetry_is_off_unless_the_environment_allows_it():
    """Recent onnxruntime builds send usage telemetry on Linux too; importing the runtime turns it off before
    onnxruntime loads, and an explicit ORT_DISABLE_TELEMETRY (e.g. 0) is left as the user set it."""
    import os

    probe = ("import os, sys, projectable_edge_runtime.graphs.runners; "
             "print(os.environ.get('ORT_DISABLE_TELEMETRY'), 'onnxruntime' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if k != "ORT_DISABLE_TELEMETRY"}
    for given, want in ((None, "1 True"), ("0", "0 True")):
        res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                             env=env if given is None else {**env, "ORT_DISABLE_TELEMETRY": given})
        assert res.stdout.split("\n")[0] == want, res.stdout

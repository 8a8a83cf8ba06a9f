"""The runtime installs and runs where users are (Python 3.10, any folder, any user, old ORT)."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the host package depends on tomli there
    import tomli as tomllib

import pytest

import projectable_edge_runtime as runtime
from projectable_edge_runtime.graphs import hardware
from projectable_edge_runtime.bundle import requirements
from projectable_edge_runtime.__main__ import main as runtime_main
from projectable_edge_runtime.bundle.atomic import atomic_output
from projectable_edge_runtime.devices.errors import ProjectableEdgeError

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


# ---------------------------------------------------------------------------- onnxruntime minimum


def test_declared_floors_match_the_runtime_constant():
    """pyproject's onnxruntime/numpy floors (host package and runtime extra) are the measured minimum."""
    deps = PYPROJECT["project"]["dependencies"] + PYPROJECT["project"]["optional-dependencies"]["runtime"]
    assert f"onnxruntime>={requirements.MIN_ONNXRUNTIME}" in deps
    assert f"numpy>={requirements.MIN_NUMPY}" in deps
    assert not any(d.startswith("onnxruntime>=1.1") and d != f"onnxruntime>={requirements.MIN_ONNXRUNTIME}"
                   for d in deps)
    assert PYPROJECT["project"]["requires-python"] == f">={requirements.MIN_PYTHON}"
    assert not any("tomli" in d for d in PYPROJECT["project"]["optional-dependencies"]["runtime"])


@pytest.mark.parametrize("text, parsed", [("1.19.0", (1, 19, 0)), ("1.20.1+cu118", (1, 20, 1)),
                                          ("1.21.0.dev20240101", (1, 21, 0)), ("1.18.0rc1", (1, 18, 0)),
                                          ("2", (2,))])
def test_parse_version(text, parsed):
    assert requirements.parse_version(text) == parsed


def test_onnxruntime_below_minimum_is_one_clear_error(rt_bundle, monkeypatch, capsys):
    """Simulated onnxruntime 1.18.1: load refuses before any session, naming both versions and the fix."""
    monkeypatch.setattr(requirements, "installed_onnxruntime_version", lambda: "1.18.1")
    with pytest.raises(ProjectableEdgeError) as e:
        runtime.load(rt_bundle)
    msg = str(e.value)
    assert "onnxruntime >= 1.19.0" in msg and "installed: onnxruntime 1.18.1" in msg
    assert "pip install 'onnxruntime>=1.19.0'" in msg and "corrupt" not in msg
    assert runtime_main(["info", str(rt_bundle)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "1.18.1" in err and "1.19.0" in err and "Traceback" not in err
    # at (or above) the minimum it loads
    monkeypatch.setattr(requirements, "installed_onnxruntime_version", lambda: "1.19.0")
    runtime.load(rt_bundle)


def test_manifest_requires_is_checked_and_never_below_the_floor(tmp_path):
    import dataclasses

    floor = requirements.requires_for()
    m = dataclasses.replace(floor, onnxruntime=">=1.22.0")
    with pytest.raises(ProjectableEdgeError, match=r"needs onnxruntime >= 1\.22\.0 .*installed: onnxruntime 1\.21\.1"):
        requirements.check_requirements(tmp_path, m, ort_version="1.21.1")
    requirements.check_requirements(tmp_path, m, ort_version="1.22.0")
    with pytest.raises(ProjectableEdgeError, match=r">= 1\.19\.0"):  # an older floor never lowers the runtime's
        requirements.check_requirements(tmp_path, dataclasses.replace(floor, onnxruntime=">=1.10"), ort_version="1.18.0")
    with pytest.raises(ProjectableEdgeError, match="expected '>=X.Y.Z'"):
        requirements.check_requirements(tmp_path, dataclasses.replace(floor, onnxruntime="~=1.19"), ort_version="1.19.0")
    requirements.check_requirements(tmp_path, floor, ort_version="1.19.0")


# ---------------------------------------------------------------------------- TOML only on the host


_NO_TOML = r"""
import sys
sys.modules["tomllib"] = None  # as on Python 3.10 without tomli: any import of them fails
sys.modules["tomli"] = None
from projectable_edge_runtime.__main__ import main
bundle, out = sys.argv[1], sys.argv[2]
codes = [main(["info", bundle]), main(["validate", bundle]), main(["sample", bundle, "-n", "2", "--out", out])]
assert codes == [0, 0, 0], codes
print("OK")
"""


def test_runtime_needs_no_toml_reader(rt_bundle, tmp_path):
    proc = subprocess.run([sys.executable, "-c", _NO_TOML, str(rt_bundle), str(tmp_path / "s.png")],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stderr[-2000:]


# ---------------------------------------------------------------------------- permissions, paths


def test_outputs_are_world_readable_under_a_private_umask(tmp_path):
    old = os.umask(0o077)
    try:
        with atomic_output(tmp_path / "out" / "f.json") as tmp:
            tmp.write_text("{}")
        with atomic_output(tmp_path / "b", directory=True) as tmp:
            (tmp / "sub").mkdir()
            (tmp / "sub" / "g.bin").write_bytes(b"x")
            (tmp / "run.sh").write_text("#!/bin/sh\n")
            (tmp / "run.sh").chmod(0o700)
    finally:
        os.umask(old)
    assert _mode(tmp_path / "out") == 0o755 and _mode(tmp_path / "out" / "f.json") == 0o644
    assert _mode(tmp_path / "b") == 0o755 and _mode(tmp_path / "b" / "sub") == 0o755
    assert _mode(tmp_path / "b" / "sub" / "g.bin") == 0o644 and _mode(tmp_path / "b" / "run.sh") == 0o755


def test_a_failed_output_removes_the_folders_it_created(tmp_path):
    (tmp_path / "keep").mkdir()
    with pytest.raises(RuntimeError):
        with atomic_output(tmp_path / "keep" / "new" / "deeper" / "b", directory=True):
            raise RuntimeError("failed half-way")
    assert list((tmp_path / "keep").iterdir()) == []  # keep/ existed before: it stays


def test_a_folder_that_cannot_take_files_is_a_clear_error():
    if not Path("/proc/self").is_dir():
        pytest.skip("needs Linux's /proc, a folder where no file can be created even by root")
    with pytest.raises(ProjectableEdgeError, match="cannot write the output file /proc/x.png .*choose a folder"):
        with atomic_output(Path("/proc/x.png")):
            pass


def test_a_name_too_long_for_its_temporary_sibling_says_to_shorten_it(tmp_path):
    # 250 characters is a legal name (a bundle named after a long task folder), but not with the temp suffix
    with pytest.raises(ProjectableEdgeError, match="File name too long.*choose a shorter name"):
        with atomic_output(tmp_path / ("t" * 250), directory=True):
            pass
    assert list(tmp_path.iterdir()) == []


def test_runtime_cli_resolves_paths_before_work(rt_bundle, tmp_path, monkeypatch):
    from projectable_edge_runtime.__main__ import build_parser

    monkeypatch.chdir(tmp_path)
    args = build_parser().parse_args(["sample", "rel/bundle", "--out", "x.png"])
    assert args.bundle == str(tmp_path / "rel" / "bundle") and args.out == str(tmp_path / "x.png")


# ---------------------------------------------------------------------------- execution providers


def test_gpu_visible_with_only_the_cpu_provider_says_how_to_fix_it(rt_bundle, monkeypatch, capsys):
    monkeypatch.setattr(hardware, "gpu_visible", lambda: "NVIDIA Jetson Orin Nano Developer Kit")
    assert runtime_main(["validate", str(rt_bundle)]) == 0
    out = capsys.readouterr().out
    assert "GPU visible: NVIDIA Jetson Orin Nano" in out
    assert "onnxruntime-gpu" in out and "--system-site-packages" in out and "--no-deps" in out
    model = runtime.load(rt_bundle)
    ex = model.backend["execution"]
    assert "AzureExecutionProvider" not in ex["available"] and ex["used"]["score"] == ["CPUExecutionProvider"]
    assert ex["gpu_hint"] and runtime.validate(model)["execution"]["gpu_hint"]
    # no GPU: no hint
    monkeypatch.setattr(hardware, "gpu_visible", lambda: None)
    assert runtime.load(rt_bundle).backend["execution"]["gpu_hint"] is None
    # a GPU provider present: no hint either
    assert hardware.gpu_hint(["CUDAExecutionProvider", "CPUExecutionProvider"], "NVIDIA Jetson") is None


def test_emulation_is_detected_and_labelled(monkeypatch):
    monkeypatch.setattr(hardware.platform, "machine", lambda: "aarch64")
    monkeypatch.setattr(hardware, "_read", lambda p: "processor\t: 0\nvendor_id\t: AuthenticAMD\n")
    assert hardware.emulated()
    monkeypatch.setattr(hardware, "_read", lambda p: "processor\t: 0\nCPU implementer\t: 0x41\n")
    assert not hardware.emulated()


# ---------------------------------------------------------------------------- from any folder, any user


@pytest.fixture(scope="module")
def cwd_bundle(tiny_run):
    """`projectable-edge generate` from an empty folder elsewhere, relative --source, default --out,
    under umask 077. The folder is 0755 so another user can reach the bundle in it."""
    work = Path(tempfile.mkdtemp(prefix="pe-any-folder-"))
    work.chmod(0o755)
    cli = Path(sys.executable).parent / "projectable-edge"
    rel = os.path.relpath(tiny_run, work)
    proc = subprocess.run([str(cli), "generate", "--task", "3", "--target", "jetson", "--source", rel],
                          cwd=work, capture_output=True, text=True, timeout=900,
                          preexec_fn=lambda: os.umask(0o077))
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-2000:]
    yield work / "bundles" / "3__jetson-orin-nano"
    shutil.rmtree(work, ignore_errors=True)


@pytest.mark.slow
def test_generate_from_any_folder_writes_a_world_readable_bundle_with_its_wheel(cwd_bundle):
    assert sorted(p.name for p in cwd_bundle.parent.iterdir()) == [".cache", "3__jetson-orin-nano"]
    for p in [cwd_bundle.parent, cwd_bundle, *cwd_bundle.rglob("*")]:
        want = 0o755 if p.is_dir() or p.name.endswith(".sh") else 0o644
        assert _mode(p) == want, (p, oct(_mode(p)))
    m = json.loads((cwd_bundle / "manifest.json").read_text())
    assert m["requires"]["onnxruntime"] == f">={requirements.MIN_ONNXRUNTIME}"
    assert m["requires"]["onnx_ir_version"] == 10 and m["requires"]["opsets"]["ai.onnx"] >= 17
    whl = m["runtime_wheel"]["path"]
    assert whl in m["files"] and whl.startswith("runtime/projectable_edge_runtime-")
    with zipfile.ZipFile(cwd_bundle / whl) as z:
        names = z.namelist()
        meta = z.read(next(n for n in names if n.endswith("METADATA"))).decode()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"projectable_edge_runtime"}  # no top-level runtime/devices/exporters
    assert "projectable_edge_runtime/devices/profiles.py" in names
    assert not any(n.endswith((".toml", ".pyc")) for n in names)
    assert f"Requires-Dist: onnxruntime>={requirements.MIN_ONNXRUNTIME}" in meta
    assert "Requires-Dist: numpy>=" in meta and "tomli" not in meta and "torch" not in meta
    with runtime.load(cwd_bundle) as model:
        assert runtime.validate(model)["passed"]


_AS_NOBODY = r"""
import json, os, pwd, sys
import numpy, onnxruntime
import projectable_edge_runtime as runtime
bundle = sys.argv[1]
def use(path):
    with runtime.load(path) as m:
        v = runtime.validate(m)
        m.sample(2, seed=0)
    return v
use(bundle)  # as root first: every lazy import happens now, while the interpreter's folders are reachable
nobody = pwd.getpwnam("nobody")
os.setgroups([]); os.setgid(nobody.pw_gid); os.setuid(nobody.pw_uid)  # from here on, another user
assert os.getuid() == nobody.pw_uid
v = use(bundle)  # reads every bundle file again (hashes, sessions) as 'nobody'
print(json.dumps({"uid": os.getuid(), "passed": v["passed"]}))
"""


@pytest.mark.slow
def test_another_user_can_load_the_bundle(cwd_bundle):
    if os.geteuid() != 0:
        pytest.skip("needs root to switch to the 'nobody' user (run the suite as root to check this)")
    # The interpreter lives where 'nobody' may not reach (e.g. under /root/.pyenv), so the process
    # imports the runtime as root and then drops to 'nobody' before it touches the bundle.
    proc = subprocess.run([sys.executable, "-c", _AS_NOBODY, str(cwd_bundle)], capture_output=True, text=True,
                          timeout=300, cwd="/")
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["uid"] != 0 and r["passed"]


@pytest.mark.slow
def test_device_check_python310_stand_in(cwd_bundle):
    """scripts/device-check.sh --py310: a Python 3.10 venv with only numpy + onnxruntime 1.19.0 and the
    bundle's wheel runs info, validate, score, sample, benchmark and imports nothing else."""
    t0 = time.perf_counter()
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "device-check.sh"), str(cwd_bundle), "--py310"],
                          capture_output=True, text=True, timeout=1200, cwd=cwd_bundle.parent)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    assert "device-check: PASS" in out
    assert "imported outside the stdlib: numpy, onnxruntime, projectable_edge_runtime" in out
    assert "python 3.10." in out and "onnxruntime 1.19.0" in out
    # the example apps as deployed: anomaly app and a serve round trip in the stand-in
    for check in ("app: anomaly", "app: serve round trip"):
        assert re.search(rf"py310\s+{check}\s+ok", out), check
    print(f"device-check --py310 took {time.perf_counter() - t0:.1f}s")


@pytest.mark.slow
def test_an_onnxruntime_bundle_decodes_with_its_compiled_graph_in_the_python310_stand_in(tiny_run, tmp_path):
    """An x86-64-cpu bundle's compiled decode graph (contrib kernels, one cache per layer) on the oldest
    onnxruntime the bundles accept: device-check --py310 passes, and `info` there names that graph."""
    cli = Path(sys.executable).parent / "projectable-edge"
    gen = subprocess.run([str(cli), "generate", "--task", "3", "--target", "x86-64-cpu", "--source", str(tiny_run),
                          "--out", str(tmp_path / "b")], capture_output=True, text=True, timeout=900)
    assert gen.returncode == 0, gen.stderr[-3000:]
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "device-check.sh"), str(tmp_path / "b"), "--py310",
                           "--no-apps"], capture_output=True, text=True, timeout=1200, cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "device-check: PASS" in out, out[-5000:]
    assert "onnxruntime 1.19.0" in out
    assert "decode graph: onnxruntime:ort_decode/decode.optimized.onnx" in out, out[-5000:]


# ---------------------------------------------------------------------------- packaging


def test_installed_import_names_are_unique():
    """The folders stay put; what lands in site-packages is projectable_edge[...] and projectable_edge_runtime[...]."""
    setup = PYPROJECT["tool"]["setuptools"]
    tops = {p.split(".")[0] for p in setup["packages"]}
    assert tops == {"projectable_edge", "projectable_edge_runtime"}
    assert setup["package-dir"]["projectable_edge_runtime"] == "runtime"
    assert setup["package-dir"]["projectable_edge_runtime.devices"] == "devices"
    assert setup["package-dir"]["projectable_edge.exporters"] == "exporters"
    assert runtime.ProjectableEdgeError is __import__("projectable_edge").ProjectableEdgeError


def test_runtime_wheel_is_reproducible_and_cached(tmp_path):
    from projectable_edge.pipeline import wheel
    from projectable_edge.pipeline.cache import StepCache

    digests, logs = [], []
    for i in range(2):  # built twice without a cache: the same bytes
        (tmp_path / str(i)).mkdir()
        info = wheel.write_runtime_wheel(tmp_path / str(i), StepCache(None), logs.append)
        digests.append(hashlib.sha256((tmp_path / str(i) / info.path).read_bytes()).hexdigest())
    assert digests[0] == digests[1] and len(logs) == 2
    cache = StepCache(tmp_path / "cache")
    for i in (2, 3):  # with a cache: built once, then copied
        (tmp_path / str(i)).mkdir()
        info = wheel.write_runtime_wheel(tmp_path / str(i), cache, logs.append)
        assert hashlib.sha256((tmp_path / str(i) / info.path).read_bytes()).hexdigest() == digests[0]
    assert len(logs) == 3 and cache.hits == ["wheel"]


_VENV_STUB = r"""#!/bin/sh
mkdir -p "$3/bin"
printf '#!/bin/sh\ntest -f "$2"\n' > "$3/bin/pip"
printf '#!/bin/sh\nexit 0\n' > "$3/bin/python"
chmod +x "$3/bin/pip" "$3/bin/python"
"""


def test_the_manifests_install_and_run_commands_leave_the_bundle_as_it_was(tmp_path):
    """`runtime_wheel.install` and `.run`, typed in the bundle folder (where their paths point), made the venv inside
    the bundle, which the loader then refused (an unlisted folder, with links)."""
    from projectable_edge.pipeline import wheel
    from projectable_edge.pipeline.cache import StepCache

    bundle = tmp_path / "b"
    bundle.mkdir()
    info = wheel.write_runtime_wheel(bundle, StepCache(None), lambda m: None)
    stubs = tmp_path / "stubs"
    stubs.mkdir()  # python3 -m venv DIR makes DIR/bin/pip (checks the wheel it is given) and DIR/bin/python
    (stubs / "python3").write_text(_VENV_STUB)
    (stubs / "python3").chmod(0o755)
    before = sorted(p.relative_to(bundle) for p in bundle.rglob("*"))
    for command in (info.install, info.run):
        proc = subprocess.run(["bash", "-c", command], cwd=bundle, env={"PATH": f"{stubs}:/usr/bin:/bin"},
                              capture_output=True, text=True)
        assert proc.returncode == 0, (command, proc.stderr)
    assert sorted(p.relative_to(bundle) for p in bundle.rglob("*")) == before


def test_host_command_without_its_dependencies_is_one_line():
    """`pip install --no-deps projectable-edge`: the command says what is missing, no traceback."""
    code = ("import sys; sys.modules['typer'] = None; sys.argv = ['projectable-edge', '--help']\n"
            "from projectable_edge.entry import main; main()")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1 and "'typer'" in proc.stderr and "projectable_edge_runtime" in proc.stderr

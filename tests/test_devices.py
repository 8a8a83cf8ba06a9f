"""Device profiles: the shipped TOML files, the loader, and its error messages."""
import json
from pathlib import Path

import pytest

from projectable_edge_runtime.devices import (
    DEFAULT_TARGET,
    DeviceProfile,
    ProjectableEdgeError,
    list_profiles,
    load_profile,
    profile_dir,
)

SHIPPED = {p.stem for p in profile_dir().glob("*.toml")}  # whatever devices/ holds: adding a file adds a case
NANO_TEXT = (profile_dir() / "jetson-orin-nano.toml").read_text()


def write_variant(tmp_path: Path, old: str, new: str, name: str = "jetson-orin-nano") -> Path:
    """The Orin Nano profile with one edit, written to tmp_path/<name>.toml."""
    assert old in NANO_TEXT, f"test setup: {old!r} not in the shipped profile"
    path = tmp_path / f"{name}.toml"
    path.write_text(NANO_TEXT.replace(old, new, 1))
    return path


PROFILE_FILES = sorted(profile_dir().glob("*.toml"))


@pytest.mark.parametrize("path", PROFILE_FILES, ids=[p.stem for p in PROFILE_FILES])
def test_every_shipped_profile_loads_and_validates(path):
    p = load_profile(path)
    assert p.name == path.stem and Path(p.source_file).name == path.name
    assert p.precisions and p.execution_providers and p.budgets.p99_latency_ms > 0
    assert p.budgets.memory_mb <= p.memory_mb
    assert (p.tensorrt is not None) == (p.compile_backend == "tensorrt")
    assert load_profile(p.name) == p and all(load_profile(a) == p for a in p.aliases)
    d = json.loads(json.dumps(p.to_dict()))  # what a bundle manifest carries reads back the same
    assert d == p.to_dict() and "source_file" not in d and DeviceProfile.from_dict(d) == p


def test_the_shipped_set_is_the_folder():
    assert {p.name for p in list_profiles()} == SHIPPED
    assert {"jetson-orin-nano", "x86-64-cpu"} <= SHIPPED  # the demo's two targets
    assert load_profile(DEFAULT_TARGET).arch == "x86_64"


@pytest.mark.parametrize("alias, name", [("jetson", "jetson-orin-nano"), ("JETSON", "jetson-orin-nano"),
                                         ("host", "x86-64-cpu"), ("cpu", "x86-64-cpu"),
                                         ("jetson-agx-orin", "jetson-agx-orin")])
def test_names_and_aliases_resolve(alias, name):
    assert load_profile(alias).name == name


def test_jetson_asks_for_tensorrt_fp16_int8():
    p = load_profile("jetson")
    assert p.compile_backend == "tensorrt"
    assert {"fp16", "int8"} <= set(p.precisions)
    assert p.tensorrt.fp16 and p.tensorrt.int8
    assert p.tensorrt.dla_core == -1 and p.tensorrt.dla_cores == 0  # no DLA on Orin Nano
    assert p.execution_providers[0] == "TensorrtExecutionProvider"
    assert p.software["tensorrt"].startswith("10.")
    assert load_profile("jetson-agx-orin").tensorrt.dla_cores == 2


def test_cpu_profiles_use_onnxruntime():
    pi, host = load_profile("raspberry-pi-5"), load_profile("host")
    assert pi.compile_backend == host.compile_backend == "onnxruntime"
    assert pi.precisions[0] == "int8" and host.precisions[0] == "fp32"
    assert pi.tensorrt is None and pi.arch == "aarch64" and pi.threads == 4


def test_unknown_target_lists_names_and_how_to_add_one():
    with pytest.raises(ProjectableEdgeError) as e:
        load_profile("jetson-thor")
    msg = str(e.value)
    assert "'jetson-thor'" in msg
    for word in [*SHIPPED, "jetson", "host", "cpu"]:
        assert word in msg
    assert "add a TOML file to devices/" in msg


@pytest.mark.parametrize("old, new, expected", [
    ('precisions = ["int8", "fp16", "fp32"]', 'precisions = ["int3", "fp16"]',
     "field 'precisions' has unknown value 'int3' (allowed: fp32, fp16, int8"),
    ("threads = 6\n", "", "field 'threads' is missing; add threads = ... above the first [table], as in the shipped "
                          "profiles in"),
    ("workspace_mb = 1024\n", "", "field 'tensorrt.workspace_mb' is missing; add workspace_mb = ... under [tensorrt]"),
    ("[budgets]\np99_latency_ms = 25.0", "[budgets]",
     "field 'budgets.p99_latency_ms' is missing; add p99_latency_ms = ... under [budgets]"),
    ('aliases = ["jetson"]', 'aliases = ["jetson", "jetson"]', "field 'aliases' repeats 'jetson'"),
    ('aliases = ["jetson"]', 'aliases = ["jetson-orin-nano"]', "field 'aliases' repeats 'jetson-orin-nano'"),
    ("memory_mb = 8192", 'memory_mb = "8GB"', "field 'memory_mb' must be an integer, got str '8GB'"),
    ("threads = 6", "threads = true", "field 'threads' must be an integer"),
    ("threads = 6", "threads = -2", "field 'threads' must be >= 0"),
    ('"CUDAExecutionProvider"', '"CudaExecutionProvider"',
     "field 'execution_providers' has unknown value 'CudaExecutionProvider'"),
    ('compile_backend = "tensorrt"', 'compile_backend = "openvino"', "field 'compile_backend'"),
    ('arch = "aarch64"', 'arch = "arm64"', "field 'arch' has unknown value 'arm64'"),
    ('name = "jetson-orin-nano"', 'name = "Jetson Orin"', "field 'name' must be lower-case"),
    ('name = "jetson-orin-nano"', 'name = "jetson-orin-nano\\n"', "field 'name' must be lower-case"),
    ('aliases = ["jetson"]', 'aliases = ["jetson\\n"]', "field 'aliases' must be lower-case"),
    ("threads = 6", "threads = 6\nprecision = 1", "field 'precision' is not a known field"),
    ('tensorrt = "10.3"', "tensorrt = 10.3", "field 'software.tensorrt' must be a string"),
    ('tensorrt = "10.3"', 'trt = "10.3"', "field 'software.tensorrt' is missing"),
    ("workspace_mb = 1024", "workspace_mb = 0", "field 'tensorrt.workspace_mb' must be >= 1"),
    ("fp16 = true", "fp16 = false", "field 'tensorrt.fp16' is false but precisions lists 'fp16'"),
    ("dla_core = -1", "dla_core = 0", "field 'tensorrt.dla_core'"),
    ("max_shapes = { batch = 32 }", "max_shapes = { batch = 32, seq = 16 }",
     "field 'tensorrt.max_shapes.seq' is not a known field (known: batch)"),  # lengths come from the model
    ("opt_shapes = { batch = 1 }", "opt_shapes = { batch = 64 }",
     "field 'tensorrt.opt_shapes.batch' must satisfy min <= opt <= max"),
    ("opt_shapes = { batch = 1 }", "opt_shapes = { }", "field 'tensorrt.opt_shapes.batch' is missing"),
    ("min_shapes = { batch = 1 }", "min_shapes = { batch = 0 }",
     "field 'tensorrt.min_shapes.batch' must be >= 1"),
    ("min_shapes = { batch = 1 }", "min_shapes = { batch = 2 }",  # the engine would refuse one image
     "field 'tensorrt.min_shapes.batch' must be 1, got 2"),
    ("p99_latency_ms = 25.0", "p99_latency_ms = 0.0", "field 'budgets.p99_latency_ms' must be > 0"),
    ("p99_latency_ms = 25.0", "p99_latency_ms = nan", "field 'budgets.p99_latency_ms' must be > 0"),
    ("memory_mb = 512", "memory_mb = 9000", "field 'budgets.memory_mb' (9000) exceeds"),
])
def test_malformed_profile_names_file_and_field(tmp_path, old, new, expected):
    path = write_variant(tmp_path, old, new)
    with pytest.raises(ProjectableEdgeError) as e:
        load_profile(str(path))
    assert str(path) in str(e.value)
    assert expected in str(e.value)


def test_tensorrt_backend_requires_tensorrt_table(tmp_path):
    start, end = NANO_TEXT.index("[tensorrt]"), NANO_TEXT.index("[budgets]")
    path = write_variant(tmp_path, NANO_TEXT[start:end], "")
    with pytest.raises(ProjectableEdgeError, match="field 'tensorrt' is missing.*; add a \\[tensorrt\\] table") as e:
        load_profile(path)
    assert str(path) in str(e.value)


def test_toml_syntax_error_names_file(tmp_path):
    path = write_variant(tmp_path, "threads = 6", "threads = = 6")
    with pytest.raises(ProjectableEdgeError, match="not valid TOML") as e:
        load_profile(path)
    assert str(path) in str(e.value)


@pytest.mark.parametrize("data, expected", [
    (NANO_TEXT.replace("Jetson Orin Nano 8GB", "Jetson Orin Nano 8 Go, carte m\xe8re", 1).encode("latin-1"),
     r"not UTF-8 text \(byte 0xe8 at offset \d+\); save the profile as UTF-8"),
    (b"\xef\xbb\xbf" + NANO_TEXT.encode(), "byte-order mark .*save the profile as UTF-8 without BOM"),
])
def test_profile_that_is_not_plain_utf8_names_file_and_fix(tmp_path, data, expected):
    path = tmp_path / "board.toml"
    path.write_bytes(data)
    with pytest.raises(ProjectableEdgeError, match=expected) as e:
        load_profile(path)
    assert str(path) in str(e.value)


def test_missing_profile_file_names_path(tmp_path):
    path = tmp_path / "nowhere.toml"
    with pytest.raises(ProjectableEdgeError, match="not found") as e:
        load_profile(str(path))
    assert str(path) in str(e.value)


def test_custom_profile_by_path(tmp_path):
    path = write_variant(tmp_path, 'aliases = ["jetson"]', 'aliases = ["my-jetson"]', name="my-board")
    path.write_text(path.read_text().replace('name = "jetson-orin-nano"', 'name = "my-board"'))
    for ref in (str(path), path):
        p = load_profile(ref)
        assert p.name == "my-board" and p.aliases == ("my-jetson",)
        assert p.source_file == str(path)
    # the same file found by name or alias in a custom profile directory
    assert load_profile("my-jetson", directory=tmp_path).name == "my-board"


def test_duplicate_alias_across_files_names_both(tmp_path):
    first = write_variant(tmp_path, 'name = "jetson-orin-nano"', 'name = "board-a"', name="board-a")
    second = write_variant(tmp_path, 'name = "jetson-orin-nano"', 'name = "board-b"', name="board-b")
    with pytest.raises(ProjectableEdgeError, match="'jetson'") as e:
        list_profiles(tmp_path)
    assert str(first) in str(e.value) and str(second) in str(e.value)


def test_file_name_must_match_profile_name(tmp_path):
    write_variant(tmp_path, 'name = "jetson-orin-nano"', 'name = "other"', name="board")
    with pytest.raises(ProjectableEdgeError, match="board.toml.*name the file other.toml"):
        list_profiles(tmp_path)

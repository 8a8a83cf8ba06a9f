"""`--json` means stdout is exactly one JSON document, for every command of both CLIs; and every CLI choice
comes from an enum whose words are the code's own."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from projectable_edge.cli import app
from projectable_edge_runtime.__main__ import main as rt_main

cli = CliRunner()


def _host(args: list[str], ok=(0,)) -> dict:
    res = cli.invoke(app, args)
    assert res.exit_code in ok, res.output
    return json.loads(res.stdout)  # the whole of stdout, strictly


def _device(capsys, args: list[str], ok=(0,)) -> dict:
    capsys.readouterr()
    code = rt_main(args)
    out = capsys.readouterr().out
    assert code in ok, out
    return json.loads(out)


def test_cli_choices_are_the_codes_own_words():
    from projectable_edge.adapt import FITS
    from projectable_edge.choices import ExtraOperator, Fit, Mixture, Preset
    from projectable_edge.config import EXTRA_OPERATOR, PRESETS
    from projectable_edge.projection import MIXTURES
    from projectable_edge_runtime.devices.choices import values

    assert set(values(Preset)) == set(PRESETS) and set(values(Mixture)) == set(MIXTURES)
    assert set(values(ExtraOperator)) == set(EXTRA_OPERATOR)
    assert values(Fit) == FITS
    res = cli.invoke(app, ["train", "--preset", "huge"])
    assert res.exit_code == 2 and "huge" in res.output and "tiny" in res.output


def test_train_help_shows_the_size_syntax():
    """Rich markup must not eat `[xLAYERS]` from the help of --small and --ladder."""
    res = cli.invoke(app, ["train", "--help"], env={"COLUMNS": "300"})
    assert res.exit_code == 0 and res.output.count("WIDTH[xLAYERS]") == 2, res.output


def test_paths_with_brackets_are_printed_as_they_are(tiny_run, tmp_path):
    """rich reads '[...]' as markup: '--out runs/[v2]/p' was reported as 'runs/p', and '[/]' failed with exit 1
    after the model was written."""
    for stem in (tmp_path / "[v2]" / "p", tmp_path / "a[/]b"):
        res = cli.invoke(app, ["project", str(tiny_run), "--task", "3", "--out", str(stem)])
        assert res.exit_code == 0 and f"-> {stem}.safetensors " in res.output, res.output


def test_tables_and_lines_print_whole_at_any_width(tiny_run):
    """rich fits tables to the console (80 columns when stdout is a pipe, or COLUMNS) by cropping their cells
    ('precisi…'), and broke long lines (a command line to copy) in two."""
    from projectable_edge_runtime.devices.profiles import list_profiles

    for columns in ("80", "20"):
        res = cli.invoke(app, ["targets"], env={"COLUMNS": columns})
        assert res.exit_code == 0 and "precisions" in res.output, res.output
        assert all(p.name in res.output and ", ".join(p.precisions) in res.output for p in list_profiles())
    res = cli.invoke(app, ["evaluate", str(tiny_run)], env={"COLUMNS": "60"})
    last = res.output.splitlines()[-1]
    assert res.exit_code == 0 and last.startswith("projected beats ") and last.endswith(" ms"), res.output


@pytest.mark.slow
def test_every_command_prints_one_json_document(tiny_run, tmp_path, capsys):
    b = tmp_path / "bundle"
    gen = _host(["generate", "--task", "3", "--target", "x86-64-cpu", "--source", str(tiny_run), "--out", str(b),
                 "--precision", "fp32", "--json"])
    assert gen["bundle"] == str(b) and gen["manifest"]["selected"] in gen["manifest"]["candidates"]
    assert _host(["targets", "--json"])["targets"]
    assert _host(["tasks", str(tiny_run), "--json"])["tasks"]
    assert "macro_bits_per_dim" in _host(["evaluate", str(tiny_run), "--json"])
    assert _host(["train", "--preset", "tiny", "--steps", "2", "--out", str(tmp_path / "r"), "--no-progress",
                  "--json"])["steps"] == 2
    p = _host(["project", str(tiny_run), "--task", "3", "--out", str(tmp_path / "p3"), "--json"])
    ex = _host(["export", p["weights"], "--out", str(tmp_path / "onnx"), "--json"])
    assert ex["graphs"]["scoring"]["parity"]["ok"]
    q = _host(["quantize", str(tmp_path / "onnx" / "scoring.onnx"), "--precision", "fp16",
               "--out", str(tmp_path / "s16.onnx"), "--json"])
    assert q["precision"] == "fp16"
    assert _host(["compile", str(tmp_path / "onnx" / "scoring.onnx"), "--target", "jetson",
                  "--out", str(tmp_path / "engine"), "--json"])["status"] == "deferred"
    assert _host(["benchmark", str(b), "--runs", "3", "--warmup", "0", "--json"], ok=(0, 1))["results"]
    assert _host(["sample", str(b), "-n", "2", "--out", str(tmp_path / "s.png"), "--json"])["n"] == 2
    assert _device(capsys, ["info", str(b), "--json"])["candidate"] == gen["manifest"]["selected"]
    assert _device(capsys, ["validate", str(b), "--json"])["passed"]
    assert _device(capsys, ["benchmark", str(b), "--runs", "3", "--warmup", "0", "--sample-runs", "2", "--json"],
                   ok=(0, 1))["results"]
    assert _device(capsys, ["sample", str(b), "-n", "2", "--out", str(tmp_path / "d.png"), "--json"])["n"] == 2
    np.save(tmp_path / "t.npy", np.zeros((2, 64), np.int64))
    assert len(_device(capsys, ["score", str(b), str(tmp_path / "t.npy"), "--json"])["bits_per_dim"]) == 2
    assert _device(capsys, ["tune", str(b), "--runs", "3", "--warmup", "0", "--json"], ok=(0, 1))["rows"]
    assert _device(capsys, ["schema"])["title"] == "projectable-edge bundle manifest"


@pytest.mark.slow
def test_adapt_json_is_one_document(tiny_run, tmp_path):
    from PIL import Image

    from projectable_edge.data import DataConfig, load_dataset

    data = load_dataset(DataConfig())
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, img in enumerate(data.spec.decode(data.split("test", "7")[:6])):
        Image.fromarray(img).save(folder / f"{i}.png")
    import shutil

    run = tmp_path / "run"  # a copy: the shared run keeps its task list
    shutil.copytree(tiny_run, run)
    rec = _host(["adapt", str(run), "--images", str(folder), "--name", "json-sevens", "--steps", "4",
                 "--fit", "embedding", "--force", "--json"])
    assert rec["task"] == "json-sevens" and Path(rec["folder"]).is_dir()


def test_console_script_exit_runs_exit_handlers_and_keeps_the_code(tmp_path):
    # the console script skips the interpreter's teardown: its exit code, its flushed output and the exit
    # handlers (temp-folder cleanup, log flushing) must survive that
    import subprocess
    import sys

    script = ("import atexit, sys; p = sys.argv[1]; atexit.register(lambda: open(p, 'w').write('ran')); "
              "sys.argv = ['projectable-edge'] + sys.argv[2:]; from projectable_edge.entry import main; main()")
    marker = tmp_path / "handler"
    res = subprocess.run([sys.executable, "-c", script, str(marker), "targets", "--json"], capture_output=True, text=True)
    assert res.returncode == 0 and json.loads(res.stdout)["targets"] and marker.read_text() == "ran"
    marker.unlink()
    res = subprocess.run([sys.executable, "-c", script, str(marker), "generate", "--task", "3", "--target", "toaster",
                          "--source", str(tmp_path)], capture_output=True, text=True)
    assert res.returncode == 2 and "toaster" in res.stderr and marker.read_text() == "ran"


def test_console_script_started_with_a_stream_closed_keeps_its_exit_code():
    # `cmd 2>&-` or `cmd >&-`: Python sets that sys stream to None; the console script's final flush must not turn
    # the command's result into a traceback and status 1
    import subprocess
    import sys

    script = "import sys; sys.argv[0] = 'projectable-edge'; from projectable_edge.entry import main; main()"
    def run(close: str, *args: str):
        return subprocess.run(["sh", "-c", f'exec "$@" {close}', "sh", sys.executable, "-c", script, *args],
                              capture_output=True, text=True)

    res = run("2>&-", "targets", "--json")
    assert res.returncode == 0 and json.loads(res.stdout)["targets"]
    res = run(">&-", "targets")
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr


def test_console_scripts_usage_errors_are_one_line_and_verbose_goes_anywhere(tmp_path):
    """click and argparse draw a usage error as a box or a usage block; both console scripts print one line,
    exit 2, and take --verbose before or after the command."""
    import subprocess
    import sys

    host = [sys.executable, "-c", "import sys; sys.argv[0] = 'projectable-edge'; "
                                  "from projectable_edge.entry import main; main()"]
    device = [sys.executable, "-m", "projectable_edge_runtime"]
    for cmd in (host + ["generate", "--precision", "int4"], host + ["train", "--threads", "0"], host + ["bogus"],
                device + ["benchmark", str(tmp_path), "--runs", "abc"], device + ["bogus"]):
        res = subprocess.run(cmd, capture_output=True, text=True)
        assert res.returncode == 2 and res.stdout == "", (cmd, res.stdout)
        assert res.stderr.startswith("error: ") and res.stderr.count("\n") == 1 and "--help" in res.stderr, res.stderr
    for cmd in (host + ["tasks", str(tmp_path), "--verbose"], host + ["--verbose", "tasks", str(tmp_path)],
                host + ["tasks", str(tmp_path), "-v"], device + ["info", str(tmp_path), "-v"],
                device + ["--verbose", "info", str(tmp_path)], device + ["info", str(tmp_path), "--verbose"]):
        res = subprocess.run(cmd, capture_output=True, text=True)
        assert res.returncode == 2 and "Traceback" in res.stderr and "rerun with --verbose" not in res.stderr, cmd


def test_json_errors_are_one_json_document_on_stdout_and_one_line_on_stderr(tmp_path):
    """--json means stdout is exactly one JSON document, a failure included: {"error", "exit_code"}, beside the
    usual one line on stderr; without --json stdout stays empty. Usage and run-time errors, both CLIs."""
    import subprocess
    import sys

    host = [sys.executable, "-c", "import sys; sys.argv[0] = 'projectable-edge'; "
                                  "from projectable_edge.entry import main; main()"]
    device = [sys.executable, "-m", "projectable_edge_runtime"]
    gone = str(tmp_path / "gone")
    for cmd, needle in ((host + ["tasks", gone, "--json"], "run folder"),
                        (host + ["generate", "--json", "--precision", "int4"], "int4"),
                        (host + ["project", gone, "--task", "3", "--out", "", "--json"], "empty argument"),
                        (device + ["info", gone, "--json"], "does not exist"),
                        (device + ["benchmark", gone, "--runs", "abc", "--json"], "abc"),
                        (device + ["--json", "bogus"], "bogus"),
                        (device + ["serve", gone, "--json"], "does not exist")):  # serve: JSON Lines, one per event
        res = subprocess.run(cmd, capture_output=True, text=True)
        assert res.returncode == 2 and res.stderr.startswith("error: ") and res.stderr.count("\n") == 1, res.stderr
        doc = json.loads(res.stdout)  # the whole of stdout: one document, on one line
        assert res.stdout.count("\n") == 1, res.stdout
        assert doc == {"error": res.stderr.strip().removeprefix("error: "), "exit_code": 2}, (cmd, doc)
        assert needle in doc["error"], doc
        res = subprocess.run([a for a in cmd if a != "--json"], capture_output=True, text=True)
        assert res.returncode == 2 and res.stdout == "", (cmd, res.stdout)


def test_console_script_speaks_when_the_terminal_reports_no_width(tmp_path):
    """COLUMNS=0 (a terminal that reports no size) made rich draw 0 columns: errors and --help printed nothing."""
    import subprocess
    import sys

    host = [sys.executable, "-c", "import sys; sys.argv[0] = 'projectable-edge'; "
                                  "from projectable_edge.entry import main; main()"]
    env = {**os.environ, "COLUMNS": "0"}
    res = subprocess.run(host + ["tasks", str(tmp_path / "gone")], capture_output=True, text=True, env=env)
    assert res.returncode == 2 and res.stderr.startswith("error: run folder"), res.stderr
    res = subprocess.run(host + ["tasks", "--help"], capture_output=True, text=True, env=env)
    assert res.returncode == 0 and "Usage" in res.stdout, res.stdout


def test_console_script_ends_quietly_when_its_reader_has_gone():
    """`projectable-edge targets | head -1`: a table (rich) ended with status 1, JSON with 0, like any Unix filter."""
    import subprocess
    import sys

    host = [sys.executable, "-c", "import sys; sys.argv[0] = 'projectable-edge'; "
                                  "from projectable_edge.entry import main; main()"]
    for args in (["targets"], ["targets", "--json"]):
        proc = subprocess.Popen(host + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        proc.stdout.close()  # the reader goes before the first write
        stderr = proc.stderr.read()
        assert proc.wait() == 0 and stderr == "", (args, stderr)


def test_console_script_refuses_an_empty_argument(tiny_run, tmp_path):
    """An unset shell variable (--out "$OUT"): click read the empty path as the current folder, so `project --out ""`
    wrote ../<folder>.safetensors and `generate --cache-dir ""` filled the current folder with cache entries."""
    import subprocess
    import sys

    host = [sys.executable, "-c", "import sys; sys.argv[0] = 'projectable-edge'; "
                                  "from projectable_edge.entry import main; main()"]
    work = tmp_path / "work"
    work.mkdir()
    for args, option in ((["project", str(tiny_run), "--task", "3", "--out", ""], "after --out"),
                         (["project", str(tiny_run), "--task", "3", "--out="], "--out= has"),
                         (["generate", "--task", "3", "--cache-dir", "", "--json"], "after --cache-dir")):
        res = subprocess.run(host + args, capture_output=True, text=True, cwd=work)
        assert res.returncode == 2 and res.stderr.count("\n") == 1, (args, res.stderr)
        assert json.loads(res.stdout)["exit_code"] == 2 if "--json" in args else res.stdout == "", res.stdout
        assert res.stderr.startswith("error: ") and option in res.stderr, res.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["work"] and not any(work.iterdir())

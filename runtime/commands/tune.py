"""Measuring candidates, and `tune`: pick the most accurate candidate within budget where it runs.

`measure` is the one protocol of `generate` (build host) and `tune` (device): each candidate in its own process
(a process's peak RSS never goes down), validated on its goldens against the fp32 PyTorch reference and timed
scoring one golden image. The bundle never changes (it stays signed): the choice goes into `<bundle>.tuned.json`
beside it, tied to the manifest digest and the chosen files' hashes; `load()` ignores a stale one with a warning."""
from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from . import console
from .benchmark import benchmark, check_counts, peak_rss_mb, stats, time_calls
from .validate import load_goldens, validate
from ..bundle.atomic import atomic_output
from ..bundle.manifest import Candidate, Manifest, decode, read_manifest, verify_files
from ..devices.errors import ProjectableEdgeError
from ..devices.profiles import DeviceProfile
from ..graphs.tokenizer import TokenizerSpec

TUNED_RECORD_SCHEMA = 2  # 2: measurements hold the bits measured where tune ran
DEFAULT_RUNS, DEFAULT_WARMUP = 200, 20


class TunedRecordWarning(UserWarning):
    """A tuned record next to a bundle was ignored (stale, unreadable, or with no fitting choice)."""


@dataclass(frozen=True)
class Budget:
    p99_ms: float  # p99 latency of scoring one image (batch 1)
    max_mb: float  # peak resident memory of the runtime process

    @classmethod
    def of(cls, manifest: Manifest, p99_ms: float | None = None, max_mb: float | None = None) -> "Budget":
        """The given budgets, else the target profile's; zero, negative or non-finite is an error."""
        b = manifest.target.budgets
        out = cls(float(b.p99_latency_ms if p99_ms is None else p99_ms),
                  float(b.memory_mb if max_mb is None else max_mb))
        for what, x, flag in (("p99 latency budget", out.p99_ms, "--p99-ms"),
                              ("memory budget", out.max_mb, "--max-mb")):
            if not (0 < x < math.inf):
                raise ProjectableEdgeError(f"{what} must be a positive number, got {x!r}; pass e.g. {flag} "
                                           "5 (or leave it out to use the target profile's budget)")
        return out


def record_path(bundle: str | Path) -> Path:
    """`bundles/3__x86-64-cpu` -> `bundles/3__x86-64-cpu.tuned.json` (beside the bundle, not inside)."""
    b = Path(bundle).resolve()
    return b.with_name(b.name + ".tuned.json")


def measure_here(request: dict[str, Any]) -> dict[str, Any]:
    """Measure one candidate in this process (`full`: all benchmark cases); a `draft` is a staged bundle."""
    from ..bundle.load import Model, load  # onnxruntime: only in the measuring process

    name, runs, warmup = request["candidate"], int(request["runs"]), int(request["warmup"])
    kw = {"providers": request.get("providers") or None, "backend": request.get("backend", "auto")}
    if request.get("draft"):
        d = request["draft"]
        model = Model(Path(request["bundle"]), name, decode(Candidate, d["candidate"], name),
                      DeviceProfile.from_dict(d["target"]), TokenizerSpec.from_dict(d["tokenizer"]), **kw)
    else:
        model = load(request["bundle"], candidate=name, tuned=False, **kw)
    with model:
        v = validate(model)
        if request.get("full"):
            results = benchmark(model, runs=runs, warmup=warmup, batch=16, sample_runs=5, raw=True)["results"]
        else:
            x1 = load_goldens(model)[0][:1]
            results = {"score_batch1": stats(time_calls(lambda: model.score(x1), runs, warmup), 1)}
        n = int(request.get("samples") or 0)
        s = results["score_batch1"]
        return {"candidate": name, "bits": v["bits"], "passed": v["passed"], "expected_bits": v["expected_bits"],
                "tolerance": v["tolerance"], "bits_per_image": v["bits_per_image"], "score_batch1": s,
                "p50_ms": s["p50_ms"], "p99_ms": s["p99_ms"], "results": results, "peak_rss_mb": peak_rss_mb(),
                "load_time_ms": model.load_time_s * 1e3, "backend": model.backend["backend"],
                "providers": model.backend["providers"],
                **({"samples": model.sample(n, seed=0).tolist()} if n else {})}


def measure(bundle: str | Path, name: str, runs: int = DEFAULT_RUNS, warmup: int = DEFAULT_WARMUP, providers=None,
            backend: str = "auto", **extra) -> dict[str, Any]:
    """measure_here in a fresh runtime process, so the peak memory is this candidate's alone."""
    request = {"bundle": str(Path(bundle).resolve()), "candidate": name, "runs": runs, "warmup": warmup,
               "providers": list(providers or []), "backend": backend, **extra}
    res = subprocess.run([sys.executable, "-m", "projectable_edge_runtime.commands.tune"], input=json.dumps(request),
                         capture_output=True, text=True)
    if res.returncode != 0:
        raise ProjectableEdgeError(f"measuring candidate {name} failed: {(res.stderr or res.stdout).strip()[-600:]}")
    return json.loads(res.stdout)


def _row(name: str, within_budget: bool, m: dict[str, Any], budget: Budget) -> dict[str, Any]:
    rss, over_p99 = m.get("peak_rss_mb"), m["p99_ms"] / budget.p99_ms
    over_mem = None if rss is None else rss / budget.max_mb
    accurate = bool(within_budget and m["passed"])
    fits_latency, fits_memory = over_p99 <= 1.0, over_mem is None or over_mem <= 1.0
    size, _, variant = name.partition("/")
    return {"candidate": name, "size": size, "variant": variant, "bits": m["bits"], "passed": m["passed"],
            "within_budget": within_budget, "p99_ms": m["p99_ms"], "p50_ms": m.get("p50_ms"), "peak_rss_mb": rss,
            "p99_over_budget": over_p99, "memory_over_budget": over_mem, "accuracy_ok": accurate,
            "fits_latency": fits_latency, "fits_memory": fits_memory, "fits": accurate and fits_latency and fits_memory}


def _closest(rows: list[dict[str, Any]], budget: Budget) -> dict[str, Any] | None:
    """The accurate candidate whose worst budget ratio is smallest, and what it misses by."""
    pool = [r for r in rows if r["accuracy_ok"]] or rows
    if not pool:
        return None
    r = min(pool, key=lambda r: max(r["p99_over_budget"], r["memory_over_budget"] or 0.0))
    misses = []
    if not r["fits_latency"]:
        misses.append(f"p99 {r['p99_ms']:.3f} ms vs budget {budget.p99_ms:g} ms "
                      f"(+{r['p99_ms'] - budget.p99_ms:.3f} ms, {r['p99_over_budget']:.2f}x)")
    if not r["fits_memory"]:
        misses.append(f"peak RSS {r['peak_rss_mb']:.1f} MB vs budget {budget.max_mb:g} MB "
                      f"(+{r['peak_rss_mb'] - budget.max_mb:.1f} MB, {r['memory_over_budget']:.2f}x)")
    if not r["accuracy_ok"]:
        misses.append("its accuracy (validation against the PyTorch reference here, or its quantization budget)")
    return {"candidate": r["candidate"], "misses_by": misses}


def pick(within_budget: dict[str, bool], measured: dict[str, dict[str, Any]], budget: Budget) -> dict[str, Any]:
    """The most accurate candidate by the bits measured HERE that validated here, met its quantization budget
    and fits the budget; ties go to the faster one. Pure: the same measurements always give the same verdict."""
    rows = [_row(n, ok, measured[n], budget) for n, ok in within_budget.items() if n in measured]
    fitting = [r for r in rows if r["fits"]]
    choice = min(fitting, key=lambda r: (r["bits"], r["p99_ms"]))["candidate"] if fitting else None
    verdict = {"choice": choice, "fits": choice is not None, "budget": asdict(budget), "rows": rows}
    if choice is None:
        verdict["closest"] = _closest(rows, budget)
    return verdict


def explain(verdict: dict[str, Any], forced: bool = False) -> str:
    """One line: the pick and why, or what came closest and by how much."""
    b = verdict["budget"]
    within = f"p99 {b['p99_ms']:g} ms and {b['max_mb']:g} MB"
    r = next((r for r in verdict["rows"] if forced or r["candidate"] == verdict["choice"]), None)
    if r:
        rss = "not measurable here" if r["peak_rss_mb"] is None else f"{r['peak_rss_mb']:.1f} MB"
        measured = f"(measured p99 {r['p99_ms']:.3f} ms, peak RSS {rss})"
        if forced:
            return (f"{r['candidate']} was forced with --candidate; it {'fits' if r['fits'] else 'does NOT fit'} "
                    f"{within} {measured}")
        return (f"picked {r['candidate']}: the most accurate candidate ({r['bits']:.4f} bits/dim measured here) "
                f"within {within} {measured}")
    c = verdict.get("closest")
    return (f"no candidate fits {within}; closest: {c['candidate']}, which misses by {'; '.join(c['misses_by'])}"
            if c else "no candidate was measured")


def _hashes(manifest: Manifest, name: str) -> dict[str, str]:
    """sha256 of every file the candidate runs from, as the manifest lists them."""
    c = manifest.candidates[name]
    return {r: manifest.files[r].sha256 for r in (c.graphs.score, c.graphs.decode, c.goldens)
            if r and r in manifest.files}


def _not_json(word: str):
    raise ValueError(f"{word} is not a JSON number")


def _measurement(m: Any) -> bool:
    """Whether m holds what pick() reads: finite bits, p50_ms, p99_ms (and peak_rss_mb or null) >= 0, boolean passed."""
    def number(v):
        return type(v) in (int, float) and 0 <= v < math.inf

    return (isinstance(m, dict) and all(number(m.get(k)) for k in ("bits", "p50_ms", "p99_ms"))
            and (m.get("peak_rss_mb") is None or number(m["peak_rss_mb"])) and isinstance(m.get("passed"), bool))


def _read_record(path: Path, manifest: Manifest) -> tuple[dict[str, Any] | None, str | None]:
    """(the tuned record at path, None) when it was made for this very bundle, else (None, why not)."""
    if not path.is_file():  # a folder, a FIFO (never read: it would block), a path given that does not exist
        return None, "it is not a file" if path.exists() else "it does not exist"
    try:
        record = json.loads(path.read_text(encoding="utf-8"), parse_constant=_not_json)
    except (OSError, ValueError) as e:  # ValueError: not UTF-8, not JSON, or NaN/Infinity
        return None, f"it is unreadable ({e})"
    if not isinstance(record, dict) or record.get("schema") != TUNED_RECORD_SCHEMA:
        return None, "it is not a tuned record this runtime reads"
    if record.get("manifest_sha256") != manifest.integrity.manifest_sha256:
        return None, "the bundle's manifest digest changed since it was tuned (regenerated or replaced)"
    return record, None


def tuned_choice(bundle: Path, manifest: Manifest, path: str | Path | None = None) -> tuple[str | None, dict]:
    """(the candidate a valid tuned record chose, info); a stale or unreadable record warns and gives None."""
    p = Path(path) if path is not None else record_path(bundle)
    if path is None and not p.exists():
        return None, {"record": str(p), "used": False, "reason": "no tuned record"}
    record, why = _read_record(p, manifest)
    choice = record and record.get("choice")
    if record is not None:
        if choice is None:
            why = "its verdict was that no candidate fits the budget"
        elif not isinstance(choice, str) or choice not in manifest.candidates:
            why = f"its choice {str(choice)[:80]!r} is not a candidate of this bundle"
        elif record.get("choice_files") != _hashes(manifest, choice):
            why = f"the files of {choice} no longer match the hashes it recorded"
    if why is not None:
        warnings.warn(f"ignoring tuned record {p}: {why}; using the bundle's default selection. Re-run "
                      f"`python -m projectable_edge_runtime tune {Path(bundle)}` to tune again.",
                      TunedRecordWarning, stacklevel=4)
        return None, {"record": str(p), "used": False, "reason": why}
    return choice, {"record": str(p), "used": True, "choice": choice, "tuned_at": record.get("tuned_at"),
                    "fits": record.get("fits")}


def _reused(path: Path, manifest: Manifest, names: list[str]) -> dict[str, dict[str, Any]]:
    """The measurements of an earlier tune of this very bundle (`--reuse`): new budgets, no re-measuring."""
    if not path.exists():
        raise ProjectableEdgeError(f"--reuse needs a tuned record at {path}; run tune without --reuse first")
    record, why = _read_record(path, manifest)
    measured = (record or {}).get("measurements")
    if record is not None and not isinstance(measured, dict):
        why = "it holds no measurements"
    elif record is not None and (bad := [n for n in names if not _measurement(measured.get(n))]):
        why = f"its measurements of {bad} are missing or do not hold numbers"
    if why is not None:
        raise ProjectableEdgeError(f"tuned record {path} cannot be reused ({why}); "
                                   "run tune without --reuse to measure again")
    return {n: measured[n] for n in names}


def tune(bundle: str | Path, p99_ms: float | None = None, max_mb: float | None = None,
         candidate: str | None = None, runs: int = DEFAULT_RUNS, warmup: int = DEFAULT_WARMUP,
         providers=None, backend: str = "auto", public_key=None, record: str | Path | None = None,
         reuse: bool = False, log=None) -> dict[str, Any]:
    """Measure the candidates here, pick one, write the record beside the bundle; return the report.

    candidate= forces one: only it is measured, and it is the choice (marked forced) even when it misses the
    budget, because the user asked for it. reuse=True picks again from the existing record's measurements."""
    manifest = read_manifest(bundle, public_key=public_key)
    d = Path(bundle).resolve()
    verify_files(d, manifest)  # a broken bundle fails here, before minutes of measuring
    budget = Budget.of(manifest, p99_ms, max_mb)
    check_counts("tune", runs=(runs, 2), warmup=(warmup, 0))
    names = [manifest.candidate(candidate) and candidate] if candidate is not None else list(manifest.candidates)
    path = Path(record) if record is not None else record_path(d)
    console.outside_bundle(d, path, "the tuned record", "write it outside the bundle folder (the default is beside "
                                                       "it: leave out --record)")
    folder = next(p for p in (path.parent, *path.parent.parents) if p.exists())  # what atomic_output writes in
    if not os.access(folder, os.W_OK):  # fail before minutes of measuring, as a broken bundle does
        raise ProjectableEdgeError(f"cannot write the tuned record {path} ({folder} is not writable); pass "
                                   "--record PATH (record= in Python) in a folder you can write to")
    if path.is_dir():  # atomic_output refuses it too, but only after the measuring
        raise ProjectableEdgeError(f"the tuned record {path} is a folder; move it away, or pass --record PATH "
                                   "(record= in Python) to write the record elsewhere")
    measured = _reused(path, manifest, names) if reuse else {}
    for n in [] if reuse else names:
        if log:
            log(f"measuring {n} ({warmup} warm-up + {runs} timed runs, own process)")
        measured[n] = measure(d, n, runs, warmup, providers, backend)
    verdict = pick({n: manifest.candidates[n].accuracy.within_budget for n in names}, measured, budget)
    forced = candidate is not None
    choice = names[0] if forced else verdict["choice"]
    rec = {"schema": TUNED_RECORD_SCHEMA, "kind": "projectable-edge tuned record", "bundle": d.name,
           "manifest_sha256": manifest.integrity.manifest_sha256, "choice": choice, "forced": forced,
           "choice_files": _hashes(manifest, choice) if choice else {}, "fits": verdict["fits"],
           "explanation": explain(verdict, forced), "budget": verdict["budget"], "rows": verdict["rows"],
           "closest": verdict.get("closest"), "measurements": measured,
           "device": {"machine": platform.machine(), "python": platform.python_version()},
           "tuned_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "reused_measurements": reuse}
    with atomic_output(path, overwrite=True, what="tuned record") as tmp:
        tmp.write_text(json.dumps(rec, indent=2) + "\n", encoding="utf-8")
    return {**rec, "record": str(path)}


def tune_text(out: dict[str, Any]) -> str:
    rows = [("candidate", "bits/dim here", "p50 ms", "p99 ms", "peak MB", "fits")]
    for r in out["rows"]:
        rows.append((r["candidate"], f"{r['bits']:.4f}", f"{r['p50_ms']:.3f}", f"{r['p99_ms']:.3f}",
                     f"{r['peak_rss_mb']:.1f}" if r["peak_rss_mb"] is not None else "-",
                     "yes" if r["fits"] else ("no (accuracy)" if not r["accuracy_ok"] else "no")))
    return "\n".join([console.table(rows), "", out["explanation"], f"record: {out['record']}"])


if __name__ == "__main__":  # the measuring worker: one JSON request on stdin, one JSON report on stdout
    sys.stdout.write(json.dumps(measure_here(json.loads(sys.stdin.read()))))

"""`generate`: project -> export -> parity -> quantize -> compile (or defer) -> validate -> bundle.

Everything is built in a staging folder beside the destination and renamed into place at
the end (runtime.manifest.staged_bundle), so an interrupted or failed run leaves no
half-written bundle. Bundle layout:

    manifest.json           schema, task, target, tokenizer, io, hashes, accuracy, latency, provenance
    fp32/ fp16/ int8-static/ scoring.onnx + decode.onnx per precision (+ their reports)
    engine/ engine_decode/  TensorRT targets: build_engine.sh (+ scoring.plan / decode.plan once built)
    ort/ ort_decode/        ONNX Runtime targets: offline-optimized graph and .ort format
    build_engine.sh         TensorRT targets: builds both engines on the device
    goldens.npz             held-out task sequences + PyTorch reference bits/dim
    report.md, samples.png, bits.png, latency.png
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from devices.errors import ProjectableEdgeError
from devices.profiles import DeviceProfile, load_profile
from projectable_edge.model import bits_per_dim
from projectable_edge.project import specialise
from projectable_edge.train import evaluate_roles, load_run, source_best
from runtime.benchmark import _ARCH
from runtime.manifest import sha256_file
from runtime.validate import DEFAULT_TOLERANCE  # |bits(goldens) - manifest| the runtime allows

PRECISIONS = ("auto", "fp32", "fp16", "int8")


@dataclass(frozen=True)
class GenerateSettings:
    task: str
    target: str = "x86-64-cpu"
    source: str = "runs/digits"
    precision: str = "auto"  # auto = every precision the profile lists, select the first that passes
    out: str | None = None  # default bundles/<task>__<target>
    overwrite: bool = False
    goldens: int = 64  # held-out sequences shipped for on-device validation
    bench_runs: int = 50  # host latency runs per variant (after warm-up)
    samples: int = 16


def _variant(precision: str) -> str:
    return "int8-static" if precision == "int8" else precision


def plan_variants(profile: DeviceProfile, precision: str) -> list[str]:
    """Which graph variants to build, in the order they are preferred for this target."""
    if precision not in PRECISIONS:
        raise ProjectableEdgeError(f"unknown precision '{precision}': choose one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return [_variant(precision)]
    return [_variant(p) for p in profile.precisions]


def _tools() -> dict:
    import onnx
    import onnxruntime

    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "python": platform.python_version(), "host": platform.machine()}


def generate(settings: GenerateSettings, log=print) -> tuple[Path, dict]:
    """Write one bundle; returns its path and manifest."""
    from exporters.compile import compile_for_target
    from exporters.onnx_export import export_onnx
    from exporters.quantize import quantize
    from runtime.manifest import staged_bundle, write_manifest

    t_start = time.perf_counter()
    profile = load_profile(settings.target)  # bad target / task / run fail before anything is written
    variants = plan_variants(profile, settings.precision)
    meta, trainables, data = load_run(Path(settings.source))
    t = data.task_index(settings.task)
    task_name = data.task_names[t]
    out = Path(settings.out) if settings.out else Path("bundles") / f"{task_name}__{profile.name}"

    t0 = time.perf_counter()
    small = specialise(trainables, "projected", t)
    projection_ms = (time.perf_counter() - t0) * 1000
    n_params = sum(v.numel() for v in small.weights.values()) + small.cfg.d_model
    log(f"projected task {task_name} in {projection_ms:.2f} ms ({n_params:,} params)")
    test = data.split("test", t)
    goldens = test[: settings.goldens]
    calibration = data.split("train", t)
    with torch.no_grad():
        ref_bits = bits_per_dim(small(torch.from_numpy(goldens)), torch.from_numpy(goldens)).numpy().astype(np.float64)
    tid = np.full(len(test), t)
    roles = evaluate_roles(trainables, test, tid, data.n_tasks, roles=("projected", "universal", "scratch"))
    roles["source"] = evaluate_roles(source_best(Path(settings.source), trainables), test, tid, data.n_tasks,
                                     roles=("source",))["source"]  # the same numbers as `evaluate`
    reference = {r: float(v[t]) for r, v in roles.items()}  # this task's test bits/dim per role

    with staged_bundle(out, overwrite=settings.overwrite) as tmp:
        steps: dict = {}
        log("exporting to ONNX (scoring + KV-cache decode) and checking parity")
        graphs, steps["export"] = export_onnx(small, None, tmp / "fp32", heldout=goldens)
        files = {"fp32": {"score": "fp32/scoring.onnx", "decode": "fp32/decode.onnx"}}
        accuracy = {"fp32": {"bits": steps["export"]["graphs"]["scoring"]["parity"]["bits_per_dim"]["onnx"]}}
        for v in variants:
            if v == "fp32":
                continue
            log(f"quantizing to {v} and validating on held-out images")
            files[v] = {}
            for kind, src in (("score", graphs.scoring), ("decode", graphs.decode)):
                dst = tmp / v / src.name
                _, rep = quantize(src, {"precision": v, "on_budget_fail": "report"}, dst,
                                  calibration=calibration, heldout=goldens, model=small)
                steps[f"quantize_{v}_{kind}"] = rep
                files[v][kind] = f"{v}/{src.name}"
                b = rep["bits_per_dim"]
                if kind == "score":
                    accuracy[v] = {"bits": b["variant"], "within_budget": b["within_budget"],
                                   "budget_rel": b["budget_rel"], "float_layers": rep.get("float_layers")}
                else:  # a variant ships both graphs: the decode graph must meet the budget too
                    accuracy[v]["decode_bits"] = b["variant"]
                    accuracy[v]["within_budget"] = accuracy[v]["within_budget"] and b["within_budget"]
        fp32_bits = accuracy["fp32"]["bits"]
        for v, a in accuracy.items():
            a["delta"] = a["bits"] - fp32_bits
            a["delta_vs_pytorch"] = a["bits"] - float(ref_bits.mean())
            a.setdefault("within_budget", True)
            a["tolerance"] = DEFAULT_TOLERANCE
        usable = [v for v in variants if v in accuracy and accuracy[v]["within_budget"]]
        selected = usable[0] if usable else "fp32"
        if settings.precision != "auto":
            why = f"precision {settings.precision} was asked for"
        elif usable:
            why = (f"first variant in {profile.name}'s precision order {list(profile.precisions)} "
                   f"that met its accuracy budget")
        else:
            why = "no variant of the profile's precisions met its accuracy budget: fell back to fp32"
        rejected = {v: "accuracy budget exceeded" for v in variants if v in accuracy and v not in usable}

        log(f"compiling {selected} for {profile.name} ({profile.compile_backend})")
        engine, steps["compile"] = _compile(compile_for_target, profile, tmp, files[selected], selected, log)
        np.savez(tmp / "goldens.npz", tokens=goldens, ref_bits=ref_bits)
        manifest = {
            "task": {"name": task_name, "index": t},
            "target": profile.to_dict(),
            "tokenizer": data.spec.to_dict(),
            "model": {"n_layer": small.cfg.n_layer, "n_head": small.cfg.n_head, "head_dim": small.cfg.head_dim,
                      "vocab_size": small.cfg.vocab_size, "block_size": small.cfg.block_size,
                      "bos_id": small.bos_id, "d_model": small.cfg.d_model,
                      "params": n_params},
            "io": {k: s.to_dict() for k, s in graphs.specs.items()},
            "graphs": files,
            "selected": selected,
            "selection": {"reason": why, "built": list(files), "rejected": rejected},
            "engine": engine,
            "accuracy": {"reference_bits": float(ref_bits.mean()), "tolerance": DEFAULT_TOLERANCE,
                         "n_goldens": int(len(goldens)), "variants": accuracy,
                         "task_test_bits": reference},
            "latency_host": {},
            "tools": _tools(),
            "provenance": {"source_run": str(settings.source), "source_config": meta,
                           "source_weights_sha256": sha256_file(Path(settings.source) / "model.safetensors"),
                           "projection_ms": projection_ms, "generate_settings": asdict(settings),
                           "steps": _summaries(steps)},
            "exercised": _exercised(engine, profile, list(files)),
        }
        write_manifest(tmp, manifest)
        manifest["latency_host"], validation, bench = _measure(tmp, list(files), selected, settings, log)
        manifest["validation_host"] = validation
        _report(tmp, manifest, bench, settings, log)
        manifest["provenance"]["generate_seconds"] = time.perf_counter() - t_start
        manifest = write_manifest(tmp, manifest)
    log(f"wrote {out} in {time.perf_counter() - t_start:.1f}s (selected {selected}, engine {engine['status']})")
    return out, manifest


def _compile(compile_for_target, profile: DeviceProfile, tmp: Path, files: dict, variant: str,
             log) -> tuple[dict, dict]:
    """Compile (or defer) both graphs of the selected variant; the manifest's `engine` entry."""
    reports = {}
    base = "engine" if profile.compile_backend == "tensorrt" else "ort"
    for kind, folder in (("score", base), ("decode", f"{base}_decode")):
        _, reports[kind] = compile_for_target(tmp / files[kind], profile, tmp / folder, log=log)
    if profile.compile_backend == "tensorrt":
        r = reports["score"]
        script = tmp / "build_engine.sh"
        script.write_text("#!/usr/bin/env bash\n# Builds both TensorRT engines of this bundle on the device.\n"
                          "set -euo pipefail\ncd \"$(dirname \"$0\")\"\n"
                          "bash engine/build_engine.sh\nbash engine_decode/build_engine.sh\n")
        script.chmod(0o755)
        return ({"status": r["status"], "variant": variant, "path": f"engine/{r['engine']}",
                 "decode_path": f"engine_decode/{reports['decode']['engine']}",
                 "command": "bash build_engine.sh", "trtexec": r["command_line"],
                 "trtexec_decode": reports["decode"]["command_line"],
                 "tensorrt_version": r["tensorrt_version_host"] or r["tensorrt_version_expected"],
                 "reason": r["reason"], "trt_check": {k: reports[k]["trt_check"]["ok"] for k in reports}},
                reports)
    return ({"status": "not-applicable", "variant": variant,
             "reason": f"{profile.name} runs ONNX Runtime; ort/ holds the offline-optimized and .ort graphs",
             "ort": {k: reports[k].get("files") for k in reports}}, reports)


def _exercised(engine: dict, profile: DeviceProfile, built: list[str]) -> dict:
    """Say plainly what this host ran and what it could not."""
    done = ["projection", "ONNX export + parity vs PyTorch (onnxruntime CPU)"]
    if len(built) > 1:
        done.append(f"quantization + validation on held-out task images: {', '.join(v for v in built if v != 'fp32')}")
    done += ["runtime validation on goldens (onnxruntime CPU)", "host latency (python -m runtime, onnxruntime CPU)"]
    not_done = []
    if engine["status"] == "deferred":
        not_done.append("TensorRT engine build: tensorrt not importable on this host; run build_engine.sh on "
                        f"the {profile.name}")
    elif engine["status"] == "not-applicable":
        done.append("ONNX Runtime offline optimization + .ort conversion (files in ort/, for ORT minimal/mobile "
                    "builds; the runtime loads the standard .onnx graphs)")
    host = platform.machine().lower()
    if engine["status"] == "deferred" or profile.arch != _ARCH.get(host, host):
        not_done.append(f"latency on the {profile.name} itself: run `python -m runtime benchmark` there")
    return {"done": done, "not_done": not_done}


def _summaries(steps: dict) -> dict:
    """Keep the manifest readable: the key numbers of each step (full reports stay in their folders)."""
    out = {}
    for k, r in steps.items():
        if k == "export":
            out[k] = {g: {"parity_ok": e["parity"]["ok"], "lines": e["parity"]["lines"]}
                      for g, e in r["graphs"].items()}
        elif k.startswith("quantize"):
            out[k] = {"line": r.get("line"), "calibration_sha256": (r.get("calibration") or {}).get("sha256"),
                      "bits_per_dim": r["bits_per_dim"]}
        else:
            out[k] = {g: {key: e.get(key) for key in ("status", "reason", "command_line")} for g, e in r.items()}
    return out


def _measure(tmp: Path, variants: list[str], selected: str, settings: GenerateSettings, log):
    """Validate every variant with the runtime, and time them side by side on this host.

    Timing runs in a fresh `python -m runtime` process: its latency and peak memory are the
    torch-free runtime's own, not those of this process (which holds torch and the run).
    """
    import runtime

    latency, validation, bench = {}, {}, None
    for v in variants:
        log(f"validating and timing {v} on this host (python -m runtime)")
        with runtime.load(tmp, precision=v, backend="onnxruntime") as model:
            validation[v] = runtime.validate(model)
        r = _runtime_benchmark(tmp, v, settings.bench_runs)
        latency[v] = {k: {m: x for m, x in s.items() if m != "times_ms"} for k, s in r["results"].items()}
        latency[v]["peak_rss_mb"] = r["peak_rss_mb"]
        if v == selected:
            bench = r
    if not validation[selected]["passed"]:
        raise ProjectableEdgeError(f"the {selected} variant failed validation on its goldens: "
                                   f"{validation[selected]}; nothing was written")
    latency["host"] = bench["host"]
    latency["verdict_on_host"] = {"verdict": bench["verdict"], "checks": bench["checks"],
                                  "note": "budgets are the target's; these numbers are the host's"}
    return latency, validation, bench


def _runtime_benchmark(bundle: Path, variant: str, runs: int) -> dict:
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "runtime", "benchmark", str(bundle), "--precision", variant, "--backend",
           "onnxruntime", "--runs", str(runs), "--warmup", "5", "--batch", "16", "--sample-runs", "5",
           "--raw", "--json"]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    if res.returncode not in (0, 1):  # 1 = over a budget: still a full report
        raise ProjectableEdgeError(f"benchmarking {variant} failed: {res.stderr.strip()[-500:]}")
    return json.loads(res.stdout)


def _report(tmp: Path, manifest: dict, bench: dict, settings: GenerateSettings, log) -> None:
    """report.md with three figures: sample grid, bits/dim per precision vs references, latency histogram."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import runtime
    from runtime.png import image_grid, write_png

    model = runtime.load(tmp)
    tokens = model.sample(settings.samples, seed=0)
    write_png(tmp / "samples.png", image_grid(model.decode_images(tokens), cols=8, scale=4))
    model.close()

    acc = manifest["accuracy"]
    names = list(acc["variants"]) + [f"{r} (PyTorch)" for r in ("projected", "universal", "source")]
    vals = [acc["variants"][v]["bits"] for v in acc["variants"]] + \
           [acc["task_test_bits"][r] for r in ("projected", "universal", "source")]
    fig, ax = plt.subplots(figsize=(7, 3))
    ax.barh(names, vals, color=["C0"] * len(acc["variants"]) + ["C2", "C1", "C3"])
    ax.set_xlim(min(vals) * 0.95, max(vals) * 1.02)
    ax.set_xlabel("bits/dim (held-out images of the task; lower is better)")
    fig.tight_layout()
    fig.savefig(tmp / "bits.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3))
    for k, s in bench["results"].items():
        if "times_ms" in s and k.startswith("score"):
            ax.hist(s["times_ms"], bins=30, alpha=0.6, label=k)
    ax.set_xlabel(f"latency on host (ms), {manifest['selected']}")
    ax.set_ylabel("runs")
    ax.legend()
    fig.tight_layout()
    fig.savefig(tmp / "latency.png", dpi=110)
    plt.close(fig)

    lat = manifest["latency_host"]
    lines = [f"# Bundle: task {manifest['task']['name']} for {manifest['target']['name']}", "",
             f"Selected variant: **{manifest['selected']}** ({manifest['selection']['reason']}).",
             f"Engine: **{manifest['engine']['status']}** — {manifest['engine'].get('reason', '')}", "",
             "| variant | bits/dim | vs fp32 | host p50 score b1 (ms) | host p99 score b1 (ms) | validation |",
             "|---|---|---|---|---|---|"]
    for v, a in acc["variants"].items():
        s = lat[v]["score_batch1"]
        ok = manifest["validation_host"][v]["passed"]
        lines.append(f"| {v} | {a['bits']:.4f} | {a['delta']:+.4f} | {s['p50_ms']:.3f} | {s['p99_ms']:.3f} | "
                     f"{'pass' if ok else 'FAIL'} |")
    ref = acc["task_test_bits"]
    lines += ["", "Reference (PyTorch, this task's test split): " +
              ", ".join(f"{r} {ref[r]:.4f}" for r in ("source", "projected", "universal", "scratch")), "",
              "Exercised on this host: " + "; ".join(manifest["exercised"]["done"]) + ".",
              "Not exercised here: " + ("; ".join(manifest["exercised"]["not_done"]) or "nothing") + ".", "",
              "![samples](samples.png)", "", "![bits/dim](bits.png)", "", "![latency](latency.png)", ""]
    (tmp / "report.md").write_text("\n".join(lines))
    log("wrote report.md, samples.png, bits.png, latency.png")


"""The apps' task metrics on held-out data: anomaly detection and classification by likelihood.

For one finished run and one bundle per task (`projectable-edge generate --task T --target jetson`:
that target's bundles hold fp32, fp16 and int8 of the same projected model), per precision:

  anomaly    (examples/anomaly) per task: AUROC of in-task vs other-task test images; the threshold
             calibrated by the app at --false-alarm-rate on the task's *validation* images (disjoint
             from the test split), and the false-alarm and miss rates it gives on the test split
  classify   (examples/classify) test accuracy over all tasks with the N bundles, beside (a) the
             universal model and (b) the source model used as classifiers the same way (host torch,
             per-image bits/dim under each task's conditioning), and the projected model in torch
  latency    per image: one bundle scoring (anomaly), N bundles scoring (classify); p50/p99

    python benchmarks/app_metrics.py --run runs/digits --bundles runs/apps/digits [--json]

The apps run exactly as shipped (imported from examples/); only the runtime's public API is used
on the bundle side. onnxruntime threads per model: --threads (default 1, so N models do not fight
over the cores).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from timing import at_least, run_main

ROOT = Path(__file__).resolve().parents[1]
PRECISIONS = ("fp32", "fp16", "int8")


def load_app(name: str):
    """examples/<name>/<name>.py as a module: the app exactly as a user runs it."""
    path = ROOT / "examples" / name / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"pe_example_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


anomaly = load_app("anomaly")
classify = load_app("classify")


# ----------------------------------------------------------------------------- host-side references (torch)

def reference_bits(run: Path, tokens: np.ndarray, n_tasks: int) -> dict[str, np.ndarray]:
    """Per-image bits/dim [N, n_tasks] under each task's conditioning: universal, source, projected (torch)."""
    import torch

    from projectable_edge.model import bits_per_dim
    from projectable_edge.project import specialise
    from projectable_edge.train import load_run, source_best

    _, model, _ = load_run(run)
    source = source_best(run, model)
    x = torch.from_numpy(tokens)
    out = {}
    with torch.no_grad():
        for role, m in (("universal", model), ("source", source), ("projected (torch)", model)):
            base = role.split()[0]
            out[role] = np.stack([bits_per_dim(specialise(m, base, t)(x), x).double().numpy()
                                  for t in range(n_tasks)], axis=1)
    return out


def run_data(run: Path):
    """(task names, test tokens, test labels, validation tokens per task) of a finished run."""
    from projectable_edge.train import load_run

    meta, _, data = load_run(run)
    x, y = data.splits["test"]
    val = [data.split("val", t) for t in range(data.n_tasks)]
    return data.task_names, x.astype(np.int64), y.astype(np.int64), val, meta["data"]["dataset"]


# ----------------------------------------------------------------------------- bundles

def find_task_bundles(folder: Path, task_names: list[str]) -> dict[str, Path]:
    """One bundle per task, matched by the manifest's task name; a missing one is named with its command."""
    found = {}
    for d in classify.find_bundles([str(folder)]):
        found[json.loads((d / "manifest.json").read_text())["task"]["name"]] = d
    missing = [t for t in task_names if t not in found]
    if missing:
        raise SystemExit(f"no bundle for task(s) {missing} in {folder}; make them with\n  for t in {' '.join(missing)}; "
                         f"do projectable-edge generate --task $t --target jetson --source RUN "
                         f"--out {folder}/${{t}}__jetson; done")
    return {t: found[t] for t in task_names}


def bundle_bits(bundles: dict[str, Path], tokens: np.ndarray, precision: str, threads: int) -> np.ndarray:
    """bits/dim [N, n_tasks] of every test image under every task bundle, via the classify app."""
    with classify.Classifier(list(bundles.values()), precision=precision, threads=threads) as clf:
        assert clf.tasks == list(bundles), (clf.tasks, list(bundles))
        return clf.bits(tokens)


def calibrated_threshold(bundle: Path, val_tokens: np.ndarray, far: float, precision: str, threads: int) -> dict:
    """The anomaly app's own calibration, on the task's validation images saved as .npy."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "val.npy"
        np.save(path, val_tokens)
        return anomaly.calibrate(bundle, far, precision=precision, images=str(path), threads=threads)


# ----------------------------------------------------------------------------- metrics

def anomaly_metrics(bits: np.ndarray, labels: np.ndarray, thresholds: list[float] | None) -> dict:
    """Per task: AUROC (in-task test = normal, other tasks' test = anomalous), FA/miss at its threshold."""
    rows = []
    for t in range(bits.shape[1]):
        normal, anomalous = bits[labels == t, t], bits[labels != t, t]
        row = {"auroc": anomaly.auroc(normal, anomalous), "n_normal": int(normal.size),
               "n_anomalous": int(anomalous.size)}
        if thresholds is not None:
            row.update(threshold=thresholds[t], **anomaly.rates(normal, anomalous, thresholds[t]))
        rows.append(row)
    macro = {k: float(np.mean([r[k] for r in rows])) for k in ("auroc", "false_alarm_rate", "miss_rate")
             if k in rows[0]}
    return {"per_task": rows, "macro": macro}


def relative_scores(bits: np.ndarray) -> np.ndarray:
    """The anomaly app's score with --reference (every other task's bundle): own bits minus the best other's."""
    out = np.empty_like(bits)
    for t in range(bits.shape[1]):
        out[:, t] = bits[:, t] - np.delete(bits, t, axis=1).min(axis=1)
    return out


def accuracy(bits: np.ndarray, labels: np.ndarray) -> dict:
    pred = bits.argmin(axis=1)
    per_task = [float((pred[labels == t] == t).mean()) for t in range(bits.shape[1])]
    return {"accuracy": float((pred == labels).mean()), "per_task": per_task, "n": int(len(labels))}


def percentiles(ms: list[float]) -> dict:
    a = np.asarray(ms)
    return {"p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)), "n": int(a.size)}


def latency(bundles: dict[str, Path], tokens: np.ndarray, precision: str, threads: int, n: int) -> dict:
    """Per image, one at a time as the apps do: one bundle (anomaly) and all N bundles (classify)."""
    rows = tokens[:n]
    with classify.Classifier(list(bundles.values()), precision=precision, threads=threads) as clf:
        one, every = clf.models[0], []
        single = []
        for i in range(len(rows)):  # warm-up included in neither
            clf.bits(rows[i:i + 1])
        for i in range(len(rows)):
            t0 = time.perf_counter()
            one.score(rows[i:i + 1])
            single.append((time.perf_counter() - t0) * 1e3)
            t0 = time.perf_counter()
            clf.bits(rows[i:i + 1])
            every.append((time.perf_counter() - t0) * 1e3)
        return {"one_model": percentiles(single), "n_models": percentiles(every), "n_bundles": len(bundles),
                "variant": one.variant}


def measure(run: Path, folder: Path, far: float, threads: int, latency_images: int, precisions) -> dict:
    names, x, y, val, dataset = run_data(run)
    bundles = find_task_bundles(folder, names)
    out = {"dataset": dataset, "run": str(run), "bundles": str(folder), "tasks": names, "n_test": int(len(x)),
           "false_alarm_rate_target": far, "threads": threads, "precisions": {}, "baselines": {}}
    val_x = np.concatenate(val)
    val_y = np.concatenate([np.full(len(v), i) for i, v in enumerate(val)])
    for p in precisions:
        bits = bundle_bits(bundles, x, p, threads)
        cal = [calibrated_threshold(bundles[t], val[i], far, p, threads) for i, t in enumerate(names)]
        rel_val = relative_scores(bundle_bits(bundles, val_x, p, threads))
        rel_th = [anomaly.threshold_at(rel_val[val_y == t, t], far) for t in range(len(names))]
        out["precisions"][p] = {
            "variant": cal[0]["precision"],
            "anomaly": anomaly_metrics(bits, y, [c["threshold"] for c in cal]),
            "anomaly_with_references": anomaly_metrics(relative_scores(bits), y, rel_th),
            "calibration_images": [c["calibration"]["n_images"] for c in cal],
            "classify": accuracy(bits, y),
            "latency": latency(bundles, x, p, threads, latency_images),
            "mean_bits_in_task": float(np.mean(bits[np.arange(len(y)), y])),
        }
    for role, bits in reference_bits(run, x, len(names)).items():
        out["baselines"][role] = {"classify": accuracy(bits, y), "anomaly": anomaly_metrics(bits, y, None),
                                  "anomaly_with_references": anomaly_metrics(relative_scores(bits), y, None),
                                  "mean_bits_in_task": float(np.mean(bits[np.arange(len(y)), y]))}
    fp32 = out["precisions"].get("fp32")
    if fp32:
        for p, r in out["precisions"].items():
            for kind in ("anomaly", "anomaly_with_references"):
                a, b = r[kind], fp32[kind]
                r[kind]["auroc_delta_vs_fp32"] = a["macro"]["auroc"] - b["macro"]["auroc"]
                r[kind]["worst_task_auroc_delta_vs_fp32"] = max(
                    abs(u["auroc"] - v["auroc"]) for u, v in zip(a["per_task"], b["per_task"]))
    return out


# ----------------------------------------------------------------------------- tables

def md(rows: list[tuple]) -> str:
    w = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    line = lambda r: "| " + " | ".join(str(c).ljust(x) for c, x in zip(r, w)) + " |"  # noqa: E731
    return "\n".join([line(rows[0]), "|" + "|".join("-" * (x + 2) for x in w) + "|", *map(line, rows[1:])])


def anomaly_table(out: dict, kind: str = "anomaly") -> str:
    ps = list(out["precisions"])
    head = ("task", *(f"AUROC {p}" for p in ps), *(f"FA / miss {p}" for p in ps))
    rows = [head]
    for i, t in enumerate(out["tasks"]):
        a = [out["precisions"][p][kind]["per_task"][i] for p in ps]
        rows.append((t, *(f"{r['auroc']:.4f}" for r in a),
                     *(f"{r['false_alarm_rate']:.3f} / {r['miss_rate']:.3f}" for r in a)))
    m = [out["precisions"][p][kind]["macro"] for p in ps]
    rows.append(("macro", *(f"{r['auroc']:.4f}" for r in m),
                 *(f"{r['false_alarm_rate']:.3f} / {r['miss_rate']:.3f}" for r in m)))
    notes = [f"{p}: macro AUROC {out['precisions'][p][kind]['auroc_delta_vs_fp32']:+.4f} vs fp32, largest per-task "
             f"|delta| {out['precisions'][p][kind]['worst_task_auroc_delta_vs_fp32']:.4f}" for p in ps if p != "fp32"
             and "auroc_delta_vs_fp32" in out["precisions"][p][kind]]
    ref = "; ".join(f"{r} {b[kind]['macro']['auroc']:.4f}" for r, b in out["baselines"].items())
    n_cal = sorted(set(out["precisions"][ps[0]]["calibration_images"]))
    return "\n".join([md(rows), *notes,
                      f"threshold: target false-alarm rate {out['false_alarm_rate_target']}, calibrated on "
                      f"{n_cal[0]}-{n_cal[-1]} validation images per task; FA/miss measured on the test split",
                      f"same detector with the host torch models (macro AUROC): {ref}"])


def classify_table(out: dict) -> str:
    rows = [("classifier", "test accuracy", "mean in-task bits/dim", "latency p50 / p99 ms per image")]
    for p, r in out["precisions"].items():
        lat = r["latency"]["n_models"]
        rows.append((f"{r['latency']['n_bundles']} projected bundles, {r['variant']}", f"{r['classify']['accuracy']:.4f}",
                     f"{r['mean_bits_in_task']:.4f}", f"{lat['p50_ms']:.3f} / {lat['p99_ms']:.3f}"))
    for role, b in out["baselines"].items():
        label = {"universal": "(a) universal model (torch)", "source": "(b) source model (torch)"}.get(role, role)
        rows.append((label, f"{b['classify']['accuracy']:.4f}", f"{b['mean_bits_in_task']:.4f}", "-"))
    one = "; ".join(f"{p} {r['latency']['one_model']['p50_ms']:.3f} / {r['latency']['one_model']['p99_ms']:.3f}"
                    for p, r in out["precisions"].items())
    return "\n".join([md(rows), f"{out['n_test']} test images, {len(out['tasks'])} tasks; one bundle per image "
                      f"(the anomaly app), p50 / p99 ms: {one}; onnxruntime threads per model: {out['threads']}"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, help="finished run folder (projectable-edge train)")
    ap.add_argument("--bundles", type=Path, help="folder holding one bundle per task")
    ap.add_argument("--tables-from", type=Path, help="print the tables of an earlier --json output instead")
    ap.add_argument("--false-alarm-rate", type=float, default=0.05)
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime threads per model")
    ap.add_argument("--latency-images", type=at_least(1), default=200)
    ap.add_argument("--precisions", default=",".join(PRECISIONS))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.tables_from:
        try:
            out = json.loads(args.tables_from.read_text())
        except (OSError, ValueError) as e:
            ap.error(f"cannot read --tables-from {args.tables_from} ({e}): give the file an earlier --json run wrote")
    elif args.run and args.bundles:
        out = measure(args.run.resolve(), args.bundles.resolve(), args.false_alarm_rate, args.threads,
                      args.latency_images, [p.strip() for p in args.precisions.split(",") if p.strip()])
    else:
        ap.error("pass --run and --bundles (or --tables-from FILE)")
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"== {out['dataset']}: anomaly detection (examples/anomaly), per task and macro\n{anomaly_table(out)}\n")
        print(f"== {out['dataset']}: anomaly detection with --reference (the other 9 task bundles): score = "
              f"bits/dim minus the best other task's\n{anomaly_table(out, 'anomaly_with_references')}\n")
        print(f"== {out['dataset']}: classification by likelihood (examples/classify)\n{classify_table(out)}")
    return 0


if __name__ == "__main__":
    run_main(main, json_stdout=True)

"""Export + quantization accuracy for every task of a run, as one JSON report.

    .venv/bin/python benchmarks/export_accuracy.py runs/digits [--out report.json]

For each task: project, export (scoring graph), check parity with PyTorch on the task's test
images, then FP16, INT8 dynamic and INT8 static (QDQ, calibrated on the task's training images)
with their bits/dim against fp32. Prints one line per task and the worst case of each check
against the variant registry's bounds (devices/variants.py: fp32 logits tolerance, each precision's
relative bits/dim budget).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from projectable_edge_runtime.devices import variants as registry  # noqa: E402
from projectable_edge.exporters.onnx_export import ExportSettings, export_onnx  # noqa: E402
from projectable_edge.exporters.quantize import quantize  # noqa: E402
from projectable_edge.project import specialise  # noqa: E402
from projectable_edge.train import load_run  # noqa: E402
from timing import run_main  # noqa: E402

VARIANTS = ("fp16", "int8-dynamic", "int8-static")


def task_report(model, data, t: int, work: Path) -> dict:
    small = specialise(model, "projected", t)
    test, train = data.split("test", t), data.split("train", t)
    graphs, rep = export_onnx(small, ExportSettings(graphs=("scoring",)), work / "fp32", heldout=test)
    parity = rep["graphs"]["scoring"]["parity"]
    fp32 = parity["bits_per_dim"]["onnx"]
    row = {"task": data.task_names[t], "fp32_max_abs_logits": parity["outputs"]["logits"]["max_abs"],
           "pytorch_bits": parity["bits_per_dim"]["pytorch"], "fp32_bits": fp32}
    for v in VARIANTS:
        _, q = quantize(graphs.scoring, {"precision": v, "on_budget_fail": "report"}, work / f"{v}.onnx",
                        calibration=train, heldout=test)
        row[f"{v}_bits"] = q["bits_per_dim"]["variant"]
        row[f"{v}_rel"] = (q["bits_per_dim"]["variant"] - fp32) / fp32
        if v == "int8-static":
            row["calibration_sha256"] = q["calibration"]["sha256"]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    _, model, data = load_run(args.run)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for t in range(data.n_tasks):
            row = task_report(model, data, t, Path(tmp) / str(t))
            rows.append(row)
            print(f"task {row['task']}: fp32 max|dlogit| {row['fp32_max_abs_logits']:.1e}  bits fp32 "
                  f"{row['fp32_bits']:.4f}  fp16 {row['fp16_rel']:+.3%}  int8-dyn {row['int8-dynamic_rel']:+.3%}  "
                  f"int8-static {row['int8-static_rel']:+.3%}", flush=True)
    worst = {"fp32_max_abs_logits": max(r["fp32_max_abs_logits"] for r in rows),
             **{f"{v}_max_abs_rel": max(abs(r[f"{v}_rel"]) for r in rows) for v in VARIANTS}}
    atol, budget = registry.FP32.tolerance("logits").atol, {v: registry.get(v).budget_rel for v in VARIANTS}
    checks = {f"fp32 logits <= {atol:g}": worst["fp32_max_abs_logits"] <= atol,
              **{f"{v} within {budget[v]:.1%}": worst[f"{v}_max_abs_rel"] <= budget[v]
                 for v in ("fp16", "int8-static")}}
    report = {"run": args.run, "tasks": rows, "worst": worst, "checks": checks}
    print("worst case: " + ", ".join(f"{k} {v:.3g}" for k, v in worst.items()))
    print("checks: " + ", ".join(f"{k}: {'pass' if v else 'FAIL'}" for k, v in checks.items()))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    run_main(main)

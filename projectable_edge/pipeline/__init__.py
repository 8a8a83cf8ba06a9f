"""`generate`: project -> export -> parity -> quantize -> measure -> select -> compile (or defer) -> bundle.

One pass (pipeline/run.py): the run's weights are read once and the task's splits come from the run's
snapshot; export and quantization are cached by content, so another target for the same task reuses
them; every candidate (size x variant) is measured once, in its own torch-free runtime process, through
the protocol `tune` uses on the device; the manifest (the runtime's typed `Manifest`) is written and
sealed once. Everything is built in a staging folder beside the destination and renamed into place at
the end, so an interrupted or failed run leaves no half-written bundle. Bundle layout
(bundles/<task>__<target>/):

    manifest.json           schema, task, target, tokenizer, candidates, selection, engine, requires, provenance
    fp32/                   scoring.onnx + decode.onnx + export_report.json (parity)
    fp16/ int8-static/ ...  scoring.onnx + decode.onnx per converted variant (reports summarised in the manifest)
    ladder/SIZE/...         --ladder: the same per extra size, with its own goldens.npz
    engine/ engine_decode/  TensorRT targets: build_engine.sh (+ scoring.plan / decode.plan once built)
    ort/ ort_decode/        ONNX Runtime targets: offline-optimized graph and .ort format
    build_engine.sh         TensorRT targets: builds both engines on the device
    goldens.npz             held-out test-split sequences + the fp32 PyTorch model's bits/dim per image
    runtime/                the runtime wheel
    report.md, samples.png, bits.png, latency.png (+ candidates.png)
"""

from projectable_edge.pipeline.plan import GenerateSettings, plan_variants, precision_choices

__all__ = ["GenerateSettings", "generate", "plan_variants", "precision_choices"]


def __getattr__(name):
    # `generate` pulls in torch and the exporters: loaded on first use, so the CLI (which reads
    # the plan's choices at start-up) stays light for commands that never generate
    if name == "generate":
        from projectable_edge.pipeline.run import generate

        globals()["generate"] = generate
        return generate
    raise AttributeError(f"module 'projectable_edge.pipeline' has no attribute {name!r}")

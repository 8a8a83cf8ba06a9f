"""`generate`: project -> export -> parity -> quantize -> measure -> select -> compile (or defer) -> bundle.

One pass (run.py): the run's weights are read once; export and quantization are cached by content, so
another target for the same task reuses them; every candidate is measured once, in its own torch-free
runtime process, through the protocol `tune` uses on the device; the manifest is written and sealed once,
in a staging folder renamed into place at the end (a failed run leaves no half-written bundle).
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

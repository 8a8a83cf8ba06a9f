"""`generate`: project -> export -> parity -> quantize -> measure -> select -> compile (or defer) -> bundle, in
one pass (run.py); every candidate is measured through the protocol `tune` uses on the device."""

from projectable_edge.pipeline.plan import GenerateSettings, precision_choices

__all__ = ["GenerateSettings", "generate", "precision_choices"]


def __getattr__(name):
    # `generate` pulls in torch and the exporters: loaded on first use, so the CLI starts light
    if name != "generate":
        raise AttributeError(f"module 'projectable_edge.pipeline' has no attribute {name!r}")
    from projectable_edge.pipeline.run import generate

    return generate

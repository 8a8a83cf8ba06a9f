"""Re-measure accuracy on the device and compare it with what the bundle recorded.

The check is on the task metric (bits/dim on held-out task images), not on raw logits:
quantized variants differ element-wise by design, and what matters is whether the
model still models the task as well as it did when the bundle was built.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from devices.errors import ProjectableEdgeError

DEFAULT_TOLERANCE = 0.02  # bits/dim, when the manifest records none


def load_goldens(model) -> tuple[np.ndarray, np.ndarray | None]:
    """(tokens int64 [N, T], PyTorch reference bits/dim [N] or None) from the bundle's goldens.npz."""
    rel = model.manifest.get("goldens", "goldens.npz")
    path = model.bundle_dir / rel
    if not path.is_file():
        raise ProjectableEdgeError(f"bundle {model.bundle_dir} has no '{rel}' (held-out task images); "
                                   "regenerate the bundle to validate it")
    try:
        with np.load(path, allow_pickle=False) as z:
            tokens = z["tokens"]
            ref = z["ref_bits"].astype(np.float64) if "ref_bits" in z.files else None
    except (KeyError, ValueError, OSError) as e:
        raise ProjectableEdgeError(f"'{path}' is not a goldens file with a 'tokens' array ({e}); "
                                   "regenerate the bundle") from None
    tokens = model.tokenizer.check_tokens(tokens)
    if ref is not None and ref.shape != (len(tokens),):
        raise ProjectableEdgeError(f"'{path}': ref_bits has shape {ref.shape}, expected ({len(tokens)},)")
    return tokens, ref


def _num(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def validate(model, tolerance: float | None = None) -> dict[str, Any]:
    """Score the goldens with the loaded variant; pass if within tolerance of the recorded bits."""
    tokens, ref = load_goldens(model)
    bits = model.score(tokens)
    acc = model.manifest["accuracy"]
    rec = (acc.get("variants") or {}).get(model.variant) or {}
    recorded = _num(rec.get("bits"))
    reference = _num(acc.get("reference_bits"))
    if tolerance is not None:
        tol, tol_src = float(tolerance), "argument"
    elif _num(rec.get("tolerance")) is not None:
        tol, tol_src = float(rec["tolerance"]), f"manifest accuracy.variants.{model.variant}.tolerance"
    elif _num(acc.get("tolerance")) is not None:
        tol, tol_src = float(acc["tolerance"]), "manifest accuracy.tolerance"
    else:
        tol, tol_src = DEFAULT_TOLERANCE, "runtime default"
    measured = float(bits.mean())
    if recorded is not None:
        against, baseline = "recorded bits for this variant", recorded
    elif reference is not None:
        against, baseline = "reference bits (no record for this variant)", reference
    elif ref is not None:
        against, baseline = "goldens ref_bits (manifest records no accuracy)", float(ref.mean())
    else:
        raise ProjectableEdgeError(f"bundle {model.bundle_dir} records no accuracy to validate against; "
                                   "regenerate the bundle")
    delta = measured - baseline
    passed = bool(abs(delta) <= tol)
    return {
        "bundle": str(model.bundle_dir), "task": model.task, "variant": model.variant,
        "backend": model.backend["backend"], "providers": model.backend["providers"],
        "n_images": int(len(tokens)),
        "bits": measured,
        "compared_with": against, "expected_bits": baseline, "delta": delta,
        "recorded_bits": recorded, "reference_bits": reference,
        "delta_vs_reference": None if reference is None else measured - reference,
        "max_abs_diff_per_image": None if ref is None else float(np.abs(bits - ref).max()),
        "tolerance": tol, "tolerance_source": tol_src,
        "verdict": "pass" if passed else "fail", "passed": passed,
    }

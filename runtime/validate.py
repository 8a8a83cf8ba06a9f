"""Re-measure accuracy on the device and compare it with what the bundle recorded.

The check is on the task metric (bits/dim on held-out task images), not on raw logits:
quantized variants differ element-wise by design, and what matters is whether the
model still models the task as well as it did when the bundle was built.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .devices.errors import ProjectableEdgeError
from .devices.variants import DEVICE_DRIFT_REL


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


def _baseline(model, acc: dict, ref) -> tuple[str, float, float | None, float | None]:
    """(what we compare with, its bits/dim, recorded bits of this variant, reference bits)."""
    rec = (acc.get("variants") or {}).get(model.variant) or {}
    recorded, reference = _num(rec.get("bits")), _num(acc.get("reference_bits"))
    if recorded is not None:
        return "recorded bits for this variant", recorded, recorded, reference
    if reference is not None:
        return "reference bits (no record for this variant)", reference, recorded, reference
    if ref is not None:
        return "goldens ref_bits (manifest records no accuracy)", float(ref.mean()), recorded, reference
    raise ProjectableEdgeError(f"bundle {model.bundle_dir} records no accuracy to validate against; "
                               "regenerate the bundle")


def _tolerance(model, acc: dict, tolerance: float | None, baseline: float) -> tuple[float, str]:
    """Absolute bits/dim tolerance and where it came from (argument, manifest, else the registry's drift)."""
    rec = (acc.get("variants") or {}).get(model.variant) or {}
    if tolerance is not None:
        return float(tolerance), "argument"
    if _num(rec.get("tolerance")) is not None:
        return float(rec["tolerance"]), f"manifest accuracy.variants.{model.variant}.tolerance"
    if _num(acc.get("tolerance")) is not None:
        return float(acc["tolerance"]), "manifest accuracy.tolerance"
    return DEVICE_DRIFT_REL * abs(baseline), f"runtime default ({DEVICE_DRIFT_REL:.0%} of the expected bits)"


def validate(model, tolerance: float | None = None) -> dict[str, Any]:
    """Score the goldens with the loaded variant; pass if within tolerance of the recorded bits."""
    tokens, ref = load_goldens(model)
    bits = model.score(tokens)
    acc = model.manifest["accuracy"]
    against, baseline, recorded, reference = _baseline(model, acc, ref)
    tol, tol_src = _tolerance(model, acc, tolerance, baseline)
    measured = float(bits.mean())
    delta = measured - baseline
    passed = bool(abs(delta) <= tol)
    return {
        "bundle": str(model.bundle_dir), "task": model.task, "variant": model.variant,
        "backend": model.backend["backend"], "providers": model.backend["providers"],
        "execution": model.backend.get("execution"),
        "n_images": int(len(tokens)),
        "bits": measured,
        "compared_with": against, "expected_bits": baseline, "delta": delta,
        "recorded_bits": recorded, "reference_bits": reference,
        "delta_vs_reference": None if reference is None else measured - reference,
        "max_abs_diff_per_image": None if ref is None else float(np.abs(bits - ref).max()),
        "tolerance": tol, "tolerance_source": tol_src,
        "verdict": "pass" if passed else "fail", "passed": passed,
    }

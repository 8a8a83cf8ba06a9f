"""Re-measure accuracy where the bundle runs, against the fp32 PyTorch model's bits/dim on the same goldens.

On the task metric, not raw logits (quantized variants differ element-wise by design), and against the PyTorch
model, never the same graph's build-host number, so a variant whose accuracy is off fails everywhere."""
from __future__ import annotations

import zipfile
import zlib
from typing import Any

import numpy as np

from ..devices.errors import ProjectableEdgeError
from .inputs import read_npy


def load_goldens(model) -> tuple[np.ndarray, np.ndarray]:
    """(tokens int64 [N, T], the fp32 PyTorch model's bits/dim per image [N]) from the candidate's goldens."""
    if not hasattr(model, "goldens_path"):  # e.g. the bundle's path instead of the Model loaded from it
        raise ProjectableEdgeError(f"validate and benchmark take a Model, got {type(model).__name__} "
                                   f"{str(model)[:80]!r}; pass runtime.load(BUNDLE)")
    path = model.goldens_path
    fix = "regenerate the bundle"
    try:
        with zipfile.ZipFile(path) as z:  # each array through the one checked .npy reader
            tokens, ref = (read_npy(z.read(f"{k}.npy"), f"'{path}' member {k}.npy") for k in ("tokens", "ref_bits"))
    except FileNotFoundError:
        raise ProjectableEdgeError(f"bundle {model.bundle_dir} has no '{path.name}' (held-out task images); "
                                   f"{fix} to validate it") from None
    except zipfile.BadZipFile:
        raise ProjectableEdgeError(f"'{path}' is not a .npz archive; {fix}") from None
    except KeyError:
        raise ProjectableEdgeError(f"'{path}' is not a goldens file with 'tokens' and 'ref_bits'; {fix}") from None
    except (OSError, EOFError, zlib.error, ProjectableEdgeError) as e:
        raise ProjectableEdgeError(f"'{path}' is unreadable ({e}); {fix}") from None
    tokens = model.tokenizer.check_tokens(tokens)
    if not len(tokens):
        raise ProjectableEdgeError(f"'{path}' holds no golden sequences; {fix}")
    if ref.shape != (len(tokens),) or not np.issubdtype(ref.dtype, np.floating):
        raise ProjectableEdgeError(f"'{path}': ref_bits has shape {ref.shape} of {ref.dtype}, expected "
                                   f"({len(tokens)},) floats; {fix}")
    return tokens, ref.astype(np.float64)


def validate(model, tolerance: float | None = None) -> dict[str, Any]:
    """Score the goldens with the loaded candidate; pass if within its tolerance of the PyTorch reference."""
    tokens, ref = load_goldens(model)
    acc = model.entry.accuracy
    number = not isinstance(tolerance, bool) and isinstance(tolerance, (int, float, np.integer, np.floating))
    if tolerance is not None and not (number and 0 <= tolerance < float("inf")):  # NaN fails every check, inf none
        raise ProjectableEdgeError(f"tolerance must be a finite number of bits/dim >= 0, got {tolerance!r}; leave "
                                   f"it out to use the candidate's ({acc.tolerance:g})")
    bits = model.score(tokens)
    tol = acc.tolerance if tolerance is None else float(tolerance)
    measured, expected = float(bits.mean()), acc.reference_bits
    passed = bool(abs(measured - expected) <= tol)
    return {"bundle": str(model.bundle_dir), "task": model.task, "candidate": model.candidate,
            "variant": model.variant, "backend": model.backend["backend"], "providers": model.backend["providers"],
            "execution": model.backend.get("execution"), "n_images": int(len(tokens)), "bits": measured,
            "compared_with": "the fp32 PyTorch model's bits/dim on the goldens", "expected_bits": expected,
            "delta": measured - expected, "tolerance": tol,
            "tolerance_source": "argument" if tolerance is not None else "the candidate's (variant registry)",
            "recorded_bits": acc.bits, "max_abs_diff_per_image": float(np.abs(bits - ref).max()),
            "bits_per_image": bits.tolist(), "verdict": "pass" if passed else "fail", "passed": passed}

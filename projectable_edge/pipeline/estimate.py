"""A host-side ESTIMATE of device latency from a profile's published peaks (the method: `estimate()`'s
"method"); its out-of-sample `error_ratio` says how far to trust it, `tune` on the device measures instead."""

from __future__ import annotations

import statistics
from dataclasses import asdict

from projectable_edge.model import ModelConfig, flops_per_image
from projectable_edge_runtime.devices import variants
from projectable_edge_runtime.devices.errors import ProjectableEdgeError
from projectable_edge_runtime.devices.profiles import DEFAULT_TARGET, DeviceProfile, Performance, load_profile

LABEL = "estimate"
ACTIVATION_BYTES = 4  # activations stay fp32 at the graph boundaries and mostly inside it (QDQ, fp16 I/O)


def cost(cfg: ModelConfig, params: int, variant: str) -> dict:
    """FLOPs, and bytes: weights read once (at the variant's width) + every layer's activations written and read."""
    t = cfg.block_size
    per_layer = 2 * cfg.d_model + 3 * cfg.d_attn + cfg.n_head * t + cfg.d_attn + cfg.d_model + 2 * cfg.d_mlp + cfg.d_model
    activations = 2 * ACTIVATION_BYTES * t * (cfg.n_layer * per_layer + cfg.vocab_size)
    weights = variants.family(variants.get(variant).family).bytes_per_weight * params
    return {"flops_per_image": flops_per_image(cfg), "bytes_per_image": weights + activations}


def roofline_ms(c: dict, perf: Performance, variant: str) -> float:
    """Ideal time of one image on a device with these peaks (no overhead): the slower of compute and memory."""
    compute = c["flops_per_image"] / perf.peak_ops(variants.get(variant).family)
    return 1e3 * max(compute, c["bytes_per_image"] / (perf.memory_bandwidth_gbs * 1e9))


def host_performance() -> Performance:
    """The nominal peaks the host's roofline uses (the default target's profile)."""
    perf = load_profile(DEFAULT_TARGET).performance
    if perf is None:  # the shipped profile has it; a locally edited one may not
        raise ProjectableEdgeError(f"devices/{DEFAULT_TARGET}.toml has no [performance] table; the latency "
                                   "estimate needs it (see the shipped profile)")
    return perf


def estimate(costs: dict[str, dict], host_p50_ms: dict[str, float], profile: DeviceProfile) -> dict:
    """{"candidates": {name: {device_p50_ms, host_p50_ms, error_ratio, ...}}, calibration...}; device_p50_ms is
    None when the profile publishes no peaks, error_ratio None when there is no other candidate to calibrate on."""
    host, dev = host_performance(), profile.performance
    raw_host = {n: roofline_ms(c, host, c["variant"]) for n, c in costs.items()}
    ratio = {n: host_p50_ms[n] / raw_host[n] for n in costs}
    k = statistics.median(ratio.values())
    rows = {}
    for n, c in costs.items():
        others = [r for m, r in ratio.items() if m != n]
        loo = statistics.median(others) * raw_host[n] if others else None  # calibrated without this candidate
        raw_dev = roofline_ms(c, dev, c["variant"]) if dev else None
        rows[n] = {"label": LABEL, "device_p50_ms": None if raw_dev is None else k * raw_dev,
                   "host_p50_ms": loo, "host_measured_p50_ms": host_p50_ms[n],
                   "error_ratio": None if loo is None else loo / host_p50_ms[n],
                   "roofline_device_ms": raw_dev, "roofline_host_ms": raw_host[n]}
    errors = [r["error_ratio"] for r in rows.values() if r["error_ratio"] is not None]
    return {"label": LABEL, "candidates": rows, "calibration": k,
            "method": "roofline max(FLOPs / peak ops, bytes / bandwidth) per image, x calibration = median "
                      "(measured host p50 / host roofline); assumes the device reaches the host's fraction of "
                      "peak; error_ratio is out of sample (each candidate against the others' calibration)",
            "device_peaks": None if dev is None else asdict(dev), "host_peaks": asdict(host),
            "error_ratio_range": [min(errors), max(errors)] if errors else None}

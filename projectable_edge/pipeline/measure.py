"""Measure the staged bundle's candidates the way a device will (once each, through `tune.measure`), then
choose what the target runs; for a ladder, the latency estimate and the host's pick use the same numbers."""

from __future__ import annotations

from dataclasses import replace

from projectable_edge.exporters.trt_check import check_tensorrt_compat
from projectable_edge.pipeline import estimate as est
from projectable_edge.pipeline.plan import AUTO, Plan
from projectable_edge_runtime.commands import tune
from projectable_edge_runtime.devices import variants
from projectable_edge_runtime.devices.choices import CompileBackend
from projectable_edge_runtime.devices.errors import ProjectableEdgeError
from projectable_edge_runtime.bundle.manifest import Candidate, HostLatency, Ladder, Selection, to_json


def measure(bundle, plan: Plan, tokenizer: dict, drafts: dict[str, Candidate], log):
    """Each candidate measured once (the main size's also with the benchmark's batch and sampling cases and
    sample images): the candidates with their bits, validation and host latency; the protocol's reports."""
    s, target = plan.settings, plan.profile.to_dict()
    raw = {}
    for name, c in drafts.items():
        log(f"validating and timing {name} on this host (own runtime process)")
        raw[name] = tune.measure(bundle, name, runs=s.bench_runs, warmup=5, backend="onnxruntime", full=c.main,
                                 samples=s.samples if c.main else 0,
                                 draft={"candidate": to_json(c), "target": target, "tokenizer": tokenizer})
    fp32 = {c.size: raw[n]["bits"] for n, c in drafts.items() if c.variant == variants.FP32.name}
    cands = {}
    for n, c in drafts.items():
        r, a = raw[n], c.accuracy
        acc = replace(a, bits=r["bits"], passed=r["passed"], vs_fp32=r["bits"] - fp32[c.size],
                      vs_universal=None if a.universal_bits is None else r["bits"] - a.universal_bits)
        results = {k: {f: x for f, x in v.items() if f != "times_ms"} for k, v in r["results"].items()}
        lat = HostLatency(r["p50_ms"], r["p99_ms"], r["peak_rss_mb"], results)
        cands[n] = replace(c, accuracy=acc, latency_host=lat)
    return cands, raw


def unbuildable(plan: Plan, root, cands: dict[str, Candidate]) -> dict[str, str]:
    """Main-size candidates the target's TensorRT cannot build, and why (the static check of their graphs)."""
    if plan.profile.compile_backend != CompileBackend.TENSORRT:
        return {}
    out = {}
    for n, c in ((n, c) for n, c in cands.items() if c.main):
        checks = [check_tensorrt_compat(root / g, plan.profile.software.get("tensorrt"))
                  for g in (c.graphs.score, c.graphs.decode) if g]
        errors = [p["message"] for r in checks for p in r["problems"] if p["severity"] == "error"]
        if errors:
            out[n] = (f"TensorRT {checks[0]['tensorrt_version']} cannot build it: {errors[0]}"
                      + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""))
    return out


def select(plan: Plan, cands: dict[str, Candidate], on_target: bool,
           unbuildable: dict[str, str] | None = None) -> tuple[str, Selection]:
    """The first main-size variant in the target's order that met its accuracy budget, validated here, the target
    can build and, where this host is the target, is not slower than fp32; else fp32."""
    unbuildable = unbuildable or {}
    main = {c.variant: (n, c) for n, c in cands.items() if c.main}
    fp32_name, fp32 = main[variants.FP32.name]
    asked = plan.settings.precision != AUTO
    rule = (f"precision {plan.settings.precision} was asked for (fp32 if it fails its accuracy checks)" if asked else
            f"first variant in {plan.profile.name}'s precision order {list(plan.profile.precisions)} that met its "
            "accuracy budget (validation split), validated against the PyTorch reference (goldens, test split) and "
            f"passes the static check of the target's compiler ({plan.profile.compile_backend})")
    rule += ("; it was asked for, so host timings never pass it over" if asked else
             "; this host is the target (ONNX Runtime on the same architecture), so a variant slower than fp32 "
             "here is passed over" if on_target else
             "; this host is not the target, so its timings do not pass a variant over (run `tune` on the device)")
    passed_over = {}
    for v in plan.variants:
        name, c = main[v]
        a, lat = c.accuracy, c.latency_host
        if not a.within_budget:
            passed_over[name] = "accuracy budget exceeded vs fp32 on the validation split"
        elif not a.passed:
            passed_over[name] = (f"failed validation against the PyTorch reference: {a.bits:.4f} vs "
                                 f"{a.reference_bits:.4f} bits/dim (tolerance {a.tolerance:.4f})")
        elif name in unbuildable:
            passed_over[name] = unbuildable[name]
        elif on_target and not asked and v != fp32.variant and lat.p50_ms > fp32.latency_host.p50_ms:
            passed_over[name] = (f"slower than fp32 on this host, which is the target: p50 {lat.p50_ms:.3f} ms vs "
                                 f"{fp32.latency_host.p50_ms:.3f} ms (score one image)")
        else:
            return name, Selection(rule, f"{v}: the first that passed every check" if not asked else
                                   f"{v} was asked for and passed its accuracy checks", passed_over)
    if not fp32.accuracy.passed or fp32_name in unbuildable:
        raise ProjectableEdgeError(f"the fp32 graph failed validation against the PyTorch reference on its goldens "
                                   f"({fp32.accuracy.bits:.5f} vs {fp32.accuracy.reference_bits:.5f} bits/dim) or "
                                   f"cannot be built for {plan.profile.name}: {unbuildable.get(fp32_name, '')}; "
                                   "nothing was written")
    return fp32_name, Selection(rule, "no planned variant passed every check: fell back to fp32", passed_over)


def ladder(plan: Plan, cands: dict[str, Candidate], raw: dict[str, dict]) -> tuple[dict[str, Candidate], Ladder]:
    """Every candidate with its device-latency ESTIMATE, ordered by it, and what `tune` would pick from the
    host's measurements against the target's budgets."""
    for n, c in cands.items():
        if not c.accuracy.passed:
            raise ProjectableEdgeError(f"ladder candidate {n} failed validation against the PyTorch reference on "
                                       "its goldens; nothing was written")
    e = est.estimate({n: {**c.cost, "variant": c.variant} for n, c in cands.items()},
                     {n: c.latency_host.p50_ms for n, c in cands.items()}, plan.profile)
    peaks = plan.profile.performance is not None
    key = (lambda n: e["candidates"][n]["device_p50_ms"]) if peaks else (lambda n: cands[n].latency_host.p50_ms)
    ordered = {n: replace(cands[n], estimate=e["candidates"][n]) for n in sorted(cands, key=key)}
    budget = tune.Budget(plan.profile.budgets.p99_latency_ms, float(plan.profile.budgets.memory_mb))
    verdict = tune.pick({n: c.accuracy.within_budget for n, c in ordered.items()}, raw, budget)
    host_pick = {"choice": verdict["choice"], "fits": verdict["fits"], "closest": verdict.get("closest"),
                 "explanation": tune.explain(verdict), "budget": verdict["budget"],
                 "note": "measured on this host against the target's budgets; run `python -m projectable_edge_runtime "
                         "tune BUNDLE` on the device for the real choice"}
    order = ("by estimated device p50 latency, fastest first" if peaks else
             "by measured host p50 latency (the profile publishes no peaks to estimate from)")
    return ordered, Ladder(tuple(dict.fromkeys(c.size for c in cands.values())), order,
                           {k: v for k, v in e.items() if k != "candidates"}, host_pick)

"""Training throughput against the machine: the trainer's steps/s and achieved FLOP/s next to torch.mm.

One optimizer step of the real trainer (every role of the preset: source, projection operator and
projected model, universal, per-task scratch; forward, backward, clipping, AdamW) on digits 8x8 and
MNIST 16x16 (`--image-size 16`), interleaved round by round with torch.mm fp32 on the same threads
(square 512: the cores' practical peak), so both see the same load. FLOPs per step are counted by
torch.utils.flop_counter, role by role (forward + backward; attention counted as its matmuls), and
the operator's share apart. A torch.profiler table says where a step's time goes; --fused also times
the plain attention form against the fused one. --prototypes times changes to the trainer, each side by
side with today's step: fused AdamW, one thread instead of the default, and (one layer's forward +
backward) per-sample weights gathered for a batched matmul vs the batch grouped by task.

    .venv/bin/python benchmarks/bench_train_speed.py [--rounds 10] [--sizes 8 16] [--threads N] [--prototypes]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

import projectable_edge.model as model_mod
from projectable_edge.config import preset
from projectable_edge.data import DataConfig, load_dataset
from projectable_edge.train import _Session, _batch, _optimizers, _step, build, stage_roles
from projectable_edge.trainables import SLICED

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import at_least, interleaved, run_main  # noqa: E402


def stepper(model, opts, cfg, data):
    """step(): the trainer's own optimizer step (`train._step`: every joint-stage role, clipping, the
    learning-rate schedule, AdamW) on the next batch per call, with these optimizers."""
    session = _Session(cfg, data, Path("."), {}, model, opts, 0, 1, torch.device("cpu"))
    roles, n = stage_roles(model, "joint"), itertools.count()
    return lambda: _step(session, model, next(n), contextlib.nullcontext(), roles)


def trainer(cfg, data):
    """(model, step()): one optimizer step of every joint-stage role per call, on the next batch."""
    model = build(cfg, data.spec, data.n_tasks)
    return model, stepper(model, _optimizers(model, cfg), cfg, data)


def counted(fn) -> float:
    """FLOPs of fn() (forward and backward matmuls), attention in its plain matmul form."""
    fused, model_mod.FUSED_ATTENTION = model_mod.FUSED_ATTENTION, False
    try:
        with FlopCounterMode(display=False) as fc:
            fn()
        return float(fc.get_total_flops())
    finally:
        model_mod.FUSED_ATTENTION = fused


def role_flops(model, cfg, data) -> dict[str, float]:
    """Forward + backward FLOPs of one step, per role; 'operator' is the projection inside 'projected'."""
    x, t = _batch(data, cfg, 0, 0, 1)
    out = {}
    for role in (r for r in model.roles if r not in SLICED):
        out[role] = counted(lambda: model(x, t, roles=(role,))[role].backward())

    def operator():
        w, bos = model.projected_all("projected")
        (sum(v.sum() for v in w.values()) + bos.sum()).backward()
    out["operator"] = counted(operator)
    model.zero_grad(set_to_none=True)
    return out


def mm_seconds(n: int = 512):
    a, b = torch.randn(n, n), torch.randn(n, n)
    return lambda: torch.mm(a, b), 2.0 * n ** 3


def where_time_goes(step, steps: int = 3, top: int = 12) -> list[dict]:
    """torch.profiler over a few steps: the ops with the most self CPU time."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    ev = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in ev)
    return [{"op": e.key, "self_share": e.self_cpu_time_total / total, "calls_per_step": e.count / steps,
             "self_ms_per_step": e.self_cpu_time_total / 1e3 / steps} for e in ev[:top]]


def fused_adamw(model, cfg, data):
    """Today's step with every AdamW rebuilt as fused=True (same groups and hyper-parameters)."""
    keep = ("params", "lr", "weight_decay", "base_lr")
    opts = {k: torch.optim.AdamW([{n: g[n] for n in keep if n in g} for g in o.param_groups], betas=(0.9, 0.99),
                                 weight_decay=cfg.weight_decay, fused=True)
            for k, o in _optimizers(model, cfg).items()}
    return stepper(model, opts, cfg, data)


def one_thread(step):
    def run():
        n = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            step()
        finally:
            torch.set_num_threads(n)
    return run


def per_sample_layer(b: int, t: int, d_in: int, d_out: int, n_task: int):
    """One per-task linear layer, forward + backward, two ways: (gathered, grouped) callables."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, t, d_in, generator=g, requires_grad=True)
    w = torch.randn(n_task, d_in, d_out, generator=g, requires_grad=True)
    ids = torch.randint(n_task, (b,), generator=g)

    def gathered():  # today: per-sample weight copies [B, in, out], one batched matmul
        (x @ w[ids]).square().sum().backward()

    def grouped():  # the batch sorted by task: one [n_t * T, in] x [in, out] matmul per task present
        order, counts = ids.argsort(), ids.bincount(minlength=n_task).tolist()
        parts = x[order].split(counts)
        sum((p.reshape(-1, d_in) @ w[k]).square().sum() for k, p in enumerate(parts) if len(p)).backward()
    return gathered, grouped


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=at_least(1), default=10)
    ap.add_argument("--sizes", type=int, nargs="+", default=[8, 16], help="8 = digits 8x8, else MNIST at SxS")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--threads", type=at_least(0), default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--fused", action="store_true", help="also time the plain attention form")
    ap.add_argument("--prototypes", action="store_true", help="also time the proposed trainer changes")
    ap.add_argument("--json", help="write the rows here too")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = preset(args.preset)
    load0 = os.getloadavg()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, preset {args.preset}, "
          f"load average {load0[0]:.2f}")
    rows = []
    for side in args.sizes:
        name = "digits 8x8" if side == 8 else f"mnist {side}x{side}"
        data = load_dataset(DataConfig() if side == 8 else DataConfig("mnist", height=side, width=side))
        model, step = trainer(cfg, data)
        flops = role_flops(model, cfg, data)
        mm, mm_flops = mm_seconds()
        fns = {"step": step, "mm": mm}
        if args.fused:
            def plain():
                model_mod.FUSED_ATTENTION = False
                try:
                    step()
                finally:
                    model_mod.FUSED_ATTENTION = True
            fns["plain"] = plain
        if args.prototypes:
            fns["fused_adamw"] = fused_adamw(model, cfg, data)
            if torch.get_num_threads() > 1:
                fns["one_thread"] = one_thread(step)
            small = cfg.small.model(data.spec)
            fns["gathered"], fns["grouped"] = per_sample_layer(cfg.batch_size, data.spec.seq_len, small.d_model,
                                                               small.d_mlp, data.n_tasks)
        t = interleaved(fns, args.rounds, {"step": 2, "plain": 2, "fused_adamw": 2, "one_thread": 2, "mm": 20,
                                           "gathered": 20, "grouped": 20})
        total = sum(v for k, v in flops.items() if k != "operator")
        sec, mm_rate = float(np.median(t["step"])), mm_flops / float(np.median(t["mm"]))
        row = {"data": name, "tokens": data.spec.seq_len, "threads": torch.get_num_threads(),
               "steps_per_s": 1 / sec, "flops_per_step": total, "flops_by_role": flops,
               "achieved_gflops": total / sec / 1e9, "mm_gflops": mm_rate / 1e9,
               "fraction_of_mm": float(np.median(total / t["step"] / (mm_flops / t["mm"]))),
               "profile": where_time_goes(step)}
        if args.fused:
            row["fused_vs_plain"] = float(np.median(t["plain"] / t["step"]))
        if args.prototypes:
            row["prototypes"] = {"fused AdamW vs today": float(np.median(t["step"] / t["fused_adamw"])),
                                 "grouped by task vs per-sample weights (one MLP layer)":
                                     float(np.median(t["gathered"] / t["grouped"]))}
            if "one_thread" in t:
                row["prototypes"]["1 thread vs today"] = float(np.median(t["step"] / t["one_thread"]))
        rows.append(row)
    print("\n| data | tokens | steps/s | GFLOP per step (fwd+bwd) | achieved GFLOP/s | torch.mm 512 GFLOP/s "
          "| fraction |" + (" fused / plain |" if args.fused else ""))
    print("|---|---|---|---|---|---|---|" + ("---|" if args.fused else ""))
    for r in rows:
        print(f"| {r['data']} | {r['tokens']} | {r['steps_per_s']:.2f} | {r['flops_per_step'] / 1e9:.2f} "
              f"| {r['achieved_gflops']:.1f} | {r['mm_gflops']:.1f} | {r['fraction_of_mm']:.0%} |"
              + (f" {r['fused_vs_plain']:.2f}x |" if args.fused else ""))
    for r in rows:
        f = r["flops_by_role"]
        print(f"\n{r['data']}: GFLOP per step by role: " + ", ".join(f"{k} {v / 1e9:.2f}" for k, v in f.items())
              + " (operator: inside projected)")
        print("where a step's time goes (torch.profiler, self CPU time):")
        for p in r["profile"]:
            print(f"  {p['op']:42s} {p['self_share']:6.1%} {p['self_ms_per_step']:8.1f} ms/step "
                  f"{p['calls_per_step']:7.0f} calls/step")
        for k, v in r.get("prototypes", {}).items():
            print(f"prototype, speed-up (> 1: faster than today): {k}: {v:.2f}x")
    print(f"\nload average {load0[0]:.2f} -> {os.getloadavg()[0]:.2f} (2-core host)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    run_main(main)

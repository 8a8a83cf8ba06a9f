"""One-shot projection vs training a per-task small model to the same bits/dim.

    .venv/bin/python benchmarks/bench_projection.py runs/digits --task 3 [--max-steps 3000] [--json]

Times `project(M, t)` (median of many calls), then trains a fresh small model of the same
architecture on task t alone (same optimizer, lr, batch size and augmentation as the run)
until its validation bits/dim reaches the projected model's, and prints both and their ratio.
If training never gets there within --max-steps, the ratio printed is a lower bound.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from projectable_edge.data import shift_augment
from projectable_edge.model import bits_per_dim, forward, init_weights, nll
from projectable_edge.train import load_run
from projectable_edge_runtime.commands.benchmark import time_calls
from timing import at_least, interleaved, ratio, run_main


def time_projection(model, task: int, repeats: int = 200) -> float:
    return float(np.median(time_calls(lambda: model.specialise("projected", task), repeats, warmup=10)))


def source_vs_small(model, task: int, tokens: torch.Tensor, repeats: int = 30) -> dict:
    """Eager scoring latency of the source M and the projected P_t on the same images (medians over interleaved
    rounds; the ratio is the median of the per-round ratios)."""
    from projectable_edge.project import specialise

    small = specialise(model, "projected", task)
    cfg, w, bos = model.specialise("source", task)
    x = tokens[:32]
    runs = {"source": lambda: forward(w, cfg, x, bos.expand(len(x), -1)), "projected": lambda: small(x)}
    with torch.no_grad():  # interleaved rounds: a burst of load hits both sides
        t = interleaved(runs, repeats, {})
    out = {f"{name}_ms": float(np.median(v)) * 1e3 for name, v in t.items()}
    out["source_over_projected"] = ratio(t["source"], t["projected"])
    out["batch"] = len(x)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run")
    ap.add_argument("--task", default="3")
    ap.add_argument("--max-steps", type=at_least(1), default=3000)
    ap.add_argument("--eval-every", type=at_least(1), default=25)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    meta, model, data = load_run(args.run)
    cfg = model.small_cfg
    train_cfg = meta["train"]
    t = data.task_index(args.task)
    val = torch.from_numpy(data.split("val", t))
    train = torch.from_numpy(data.split("train", t))
    with torch.no_grad():
        target = float(bits_per_dim(model.logits("projected", val, torch.full((len(val),), t)), val).mean())
    proj_s = time_projection(model, t)
    latency = source_vs_small(model, t, val)

    g = torch.Generator().manual_seed(0)
    w = {k: torch.nn.Parameter(v) for k, v in init_weights(cfg, g).items()}
    bos = torch.nn.Parameter(torch.randn(cfg.d_model, generator=g) * 0.02)
    opt = torch.optim.AdamW([*w.values(), bos], lr=train_cfg["lr"], betas=(0.9, 0.99))
    bs = train_cfg["batch_size"]
    t0 = time.perf_counter()
    reached, best, steps = None, float("inf"), 0
    for steps in range(1, args.max_steps + 1):
        x = train[torch.randint(len(train), (bs,), generator=g)]
        if train_cfg["shift"]:
            x = shift_augment(x, data.spec, g, train_cfg["shift"])
        loss = nll(forward(w, cfg, x, bos.expand(bs, -1)), x)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_([*w.values(), bos], train_cfg["grad_clip"])
        opt.step()
        if steps % args.eval_every == 0:
            with torch.no_grad():
                b = float(bits_per_dim(forward(w, cfg, val, bos.expand(len(val), -1)), val).mean())
            best = min(best, b)
            if b <= target:
                reached = steps
                break
    train_s = time.perf_counter() - t0
    res = {"task": data.task_names[t], "projected_val_bits": target, "projection_ms": proj_s * 1e3,
           "scratch_reached_at_step": reached, "scratch_best_val_bits": best, "scratch_steps": steps,
           "scratch_train_s": train_s, "ratio_train_over_project": train_s / proj_s,
           "ratio_is_lower_bound": reached is None, **latency}
    if args.json:
        print(json.dumps(res, indent=2))
        return
    print(f"task {res['task']}: projected model val bits/dim {target:.4f}")
    print(f"  projection (one shot, no data):      {res['projection_ms']:.2f} ms (median)")
    if reached:
        print(f"  train per-task small model to match:  {train_s:.1f} s ({reached} steps)")
    else:
        print(f"  train per-task small model:           not reached in {steps} steps ({train_s:.1f} s; "
              f"best {best:.4f} bits/dim)")
    print(f"  ratio training / projection:          {'>= ' if reached is None else ''}"
          f"{res['ratio_train_over_project']:,.0f}x")
    print(f"  PyTorch eager scoring, batch {latency['batch']}: source {latency['source_ms']:.2f} ms, "
          f"projected {latency['projected_ms']:.2f} ms (source / projected = {latency['source_over_projected']:.1f}x)")


if __name__ == "__main__":
    run_main(main, json_stdout=True)

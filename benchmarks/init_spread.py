"""How much does the universal baseline move with nothing but its initial weights?

Trains only the universal small model of the preset, on one dataset split and one batch
sequence, from several initial draws, and prints its test macro bits/dim per draw. This is the
noise floor of a single run's universal number: a change to another role that moves the universal
by less than this spread is an init-draw effect, not a method effect.

    python benchmarks/init_spread.py --dataset mnist --seed 1 --draws 5
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from projectable_edge.config import preset
from projectable_edge.data import DataConfig, load_dataset
from projectable_edge.model import init_weights
from projectable_edge.train import _batch, _lr_scale, build, evaluate_roles
from projectable_edge.trainables import role_generator
from timing import at_least, run_main


def train_universal(cfg, data, draw: int) -> float:
    model = build(cfg, data.spec, data.n_tasks)
    g = role_generator(10_000 + draw, "universal")  # only the universal's init changes with `draw`
    with torch.no_grad():
        for name, w in init_weights(model.small_cfg, g).items():
            model.universal.weights()[name].copy_(w)
        model.universal_task.copy_(torch.randn(model.universal_task.shape, generator=g) * 0.02)
    params = model.role_params()["universal"]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay)
    val_x, val_t = data.splits["val"]
    best, best_state = float("inf"), None
    for step in range(cfg.steps):
        x, t = _batch(data, cfg, step, 0, 1)
        loss = torch.nn.functional.cross_entropy(model.logits("universal", x, t).flatten(0, 1), x.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        for group in opt.param_groups:
            group["lr"] = cfg.lr * _lr_scale(step, cfg)
        opt.step()
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:  # the trainer's best-checkpoint rule
            v = float(evaluate_roles(model, val_x, val_t, data.n_tasks, roles=("universal",))["universal"].mean())
            if v < best:
                best, best_state = v, [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, b in zip(params, best_state):
            p.copy_(b)
    test_x, test_t = data.splits["test"]
    return float(evaluate_roles(model, test_x, test_t, data.n_tasks, roles=("universal",))["universal"].mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--seed", type=int, default=0, help="split and batch seed (fixed across draws)")
    ap.add_argument("--draws", type=at_least(2), default=5, help="at least 2: the spread needs two")
    ap.add_argument("--preset", default="small")
    args = ap.parse_args()
    cfg = preset(args.preset, seed=args.seed)
    data = load_dataset(DataConfig(args.dataset, seed=args.seed))
    bits = [train_universal(cfg, data, d) for d in range(args.draws)]
    spread = {"draws": bits, "mean": float(np.mean(bits)), "std": float(np.std(bits, ddof=1)),
              "range_pct": 100 * (max(bits) - min(bits)) / float(np.mean(bits))}
    print(json.dumps({"dataset": args.dataset, "seed": args.seed, **spread}, indent=1))


if __name__ == "__main__":
    run_main(main)

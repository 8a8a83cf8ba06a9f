"""Training steps per second with fused attention (scaled_dot_product_attention) vs the plain form.

One optimizer step of the real trainer (every role, the small preset's shapes) on digits 8x8 and
MNIST at 8x8 and 14x14; the two attention paths are interleaved so both see the same machine load.

    python benchmarks/bench_train_speed.py [--steps 20] [--sizes 8 14] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

import projectable_edge.model as model_mod
from projectable_edge.config import preset
from projectable_edge.data import DataConfig, load_dataset
from projectable_edge.train import _batch, _optimizers, build, joint_loss


def time_steps(cfg, data, steps: int) -> float:
    """Median seconds per optimizer step (after 2 warm-up steps)."""
    model = build(cfg, data)
    opts = _optimizers(model, cfg)
    times = []
    for step in range(steps + 2):
        x, t = _batch(data, cfg, step, 0, 1)
        start = time.perf_counter()
        loss = joint_loss(model(x, t), cfg.lam)
        for o in opts.values():
            o.zero_grad(set_to_none=True)
        loss.backward()
        for o in opts.values():
            o.step()
        times.append(time.perf_counter() - start)
    return float(np.median(times[2:]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--sizes", type=int, nargs="+", default=[8, 14], help="MNIST image sizes")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--json", help="write the rows here too")
    args = ap.parse_args()
    cfg = preset(args.preset)
    sets = [("digits 8x8", DataConfig())] + [(f"mnist {s}x{s}", DataConfig("mnist", height=s, width=s))
                                              for s in args.sizes]
    rows = []
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, preset {args.preset}")
    print("| data | tokens | fused steps/s | plain steps/s | fused / plain |")
    print("|---|---|---|---|---|")
    for name, dcfg in sets:
        data = load_dataset(dcfg)
        res = {}
        for fused in (True, False, True, False):  # interleaved: A B A B, keep the better of each
            model_mod.FUSED_ATTENTION = fused
            res[fused] = min(res.get(fused, 1e9), time_steps(cfg, data, args.steps))
        model_mod.FUSED_ATTENTION = True
        row = {"data": name, "tokens": data.spec.seq_len, "fused_steps_per_s": 1 / res[True],
               "plain_steps_per_s": 1 / res[False], "speedup": res[False] / res[True]}
        rows.append(row)
        print(f"| {name} | {row['tokens']} | {row['fused_steps_per_s']:.2f} | {row['plain_steps_per_s']:.2f} | "
              f"{row['speedup']:.2f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()

"""The trainer: source + projection operator jointly, and the baselines, in one run.

One optimizer step trains every role on the same batch (same splits, same step count):
    joint:     NLL(M) + lam * mean over sizes NLL(P_t)  -> source and operators (operators at a lower lr)
    universal: NLL(universal small), per size           -> its own weights
    scratch:   NLL(per-task small)                      -> each task's own weights
The baselines share no parameters with anything, so one backward of the summed losses gives
each exactly the gradient of its own objective; each unit's gradient norm is clipped on its own.

Runs under plain `python` (one process) or `torchrun` (PyTorch DDP: gloo on CPU, NCCL on GPU).
The run folder is built as `.<name>.partial` next to its destination and renamed when
training ends, so `runs/<name>` never holds a half-written run; an interrupted run keeps
its resumable state in the partial folder (`--resume`).
"""

from __future__ import annotations

import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from projectable_edge_runtime.devices.errors import ProjectableEdgeError
from projectable_edge.checkpoint import load_json, load_tensors, save_json, save_tensors
from projectable_edge.config import TrainConfig
from projectable_edge.data import DataConfig, TaskData, load_dataset, shift_augment
from projectable_edge.model import bits_per_dim
from projectable_edge.train_state import Progress, load_state, save_state, snapshot
from projectable_edge.trainables import Trainables
from projectable_edge_runtime.atomic import ensure_folder
from projectable_edge_runtime.manifest import sha256_file

RUN_FORMAT = 2  # 2: per-role generators, per-space mixtures, ladder


def partial_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.partial"


def run_config(cfg: TrainConfig, data_cfg: DataConfig, data: TaskData) -> dict:
    return {
        "format": "projectable-edge-run",
        "format_version": RUN_FORMAT,
        "train": cfg.to_dict(),
        "data": data_cfg.to_dict(),
        "tokenizer": data.spec.to_dict(),
        "task_names": list(data.task_names),
        "dataset_fingerprint": data.fingerprint,
        "source_model": cfg.source.model(data.spec).to_dict(),
        "small_model": cfg.small.model(data.spec).to_dict(),
        "projection": cfg.projection.to_dict(),
        "ladder_models": {n: w.model(data.spec).to_dict() for n, w in cfg.rungs().items()},
    }


def build(cfg: TrainConfig, data: TaskData) -> Trainables:
    ladder = {n: w.model(data.spec) for n, w in cfg.rungs().items()}
    return Trainables(cfg.source.model(data.spec), cfg.small.model(data.spec), data.n_tasks, cfg.projection,
                      seed=cfg.seed, ladder=ladder)


def _optimizers(model: Trainables, cfg: TrainConfig) -> dict[str, torch.optim.Optimizer]:
    p = model.role_params()
    groups = {"joint": [{"params": q, "lr": cfg.projector_lr, "weight_decay": 0.0}
                        for unit, q in p.items() if unit.startswith("projector")]}
    groups.update({unit: [{"params": q, "lr": cfg.lr}] for unit, q in p.items()
                   if unit.startswith(("universal", "scratch"))})
    if not cfg.freeze_source:
        groups["joint"].insert(0, {"params": p["source"], "lr": cfg.lr})
    else:
        for q in p["source"]:
            q.requires_grad_(False)
    opts = {}
    for name, g in groups.items():
        for group in g:
            group["base_lr"] = group["lr"]
        opts[name] = torch.optim.AdamW(g, betas=(0.9, 0.99), weight_decay=cfg.weight_decay)
    return opts


def _lr_scale(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to 10%."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    frac = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))


def _clip(model: Trainables, cfg: TrainConfig) -> None:
    """Clip each role's gradient norm on its own; scratch per task, as separate models would be."""
    p = model.role_params()
    for unit, params in p.items():
        if unit != "scratch":
            torch.nn.utils.clip_grad_norm_([q for q in params if q.grad is not None], cfg.grad_clip)
    grads = [q.grad for q in p["scratch"] if q.grad is not None]
    if grads:
        norms = torch.stack([g.flatten(1).norm(dim=1) for g in grads]).norm(dim=0)  # [n_task]
        scale = (cfg.grad_clip / (norms + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(scale.view(-1, *([1] * (g.dim() - 1))))


@torch.no_grad()
def evaluate_roles(model: Trainables, tokens: np.ndarray, task_ids: np.ndarray, n_task: int,
                   roles=None, batch: int = 256) -> dict[str, np.ndarray]:
    """Per-task mean bits/dim of each role on a split: {role: [n_task]}."""
    was = model.training
    model.eval()
    out = {}
    device = next(model.parameters()).device
    x_all, t_all = torch.from_numpy(tokens).to(device), torch.from_numpy(task_ids).to(device)
    for role in roles or model.roles:
        bits = torch.cat([bits_per_dim(model.logits(role, x_all[i:i + batch], t_all[i:i + batch]), x_all[i:i + batch])
                          for i in range(0, len(x_all), batch)]).cpu().numpy()
        out[role] = np.array([bits[task_ids == t].mean() if (task_ids == t).any() else np.nan for t in range(n_task)])
    model.train(was)
    return out


def _batch(data: TaskData, cfg: TrainConfig, step: int, rank: int, world: int):
    """A deterministic function of (seed, step, rank): resuming replays the same batches."""
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * world + rank)
    tokens, task_ids = data.splits["train"]
    idx = torch.randint(len(tokens), (cfg.batch_size,), generator=g)
    x = torch.from_numpy(tokens)[idx]
    if cfg.shift:
        x = shift_augment(x, data.spec, g, max_shift=cfg.shift)
    return x, torch.from_numpy(task_ids)[idx]


def checkpointed_roles(model: Trainables) -> tuple[str, ...]:
    """Roles that keep their own best-validation weights (ladder projectors ride with 'projected')."""
    return tuple(r for r in model.roles if not r.startswith("projected@"))


def joint_loss(losses: dict[str, torch.Tensor], lam: float) -> torch.Tensor:
    """NLL(M) + lam * mean over sizes of NLL(P_t), plus every baseline's own loss.

    The roles share no parameters except source <- projected, so one backward gives each
    baseline exactly the gradient of its own objective.
    """
    projected = [v for r, v in losses.items() if r.startswith("projected")]
    baselines = [v for r, v in losses.items() if r.startswith(("universal", "scratch"))]
    return losses["source"] + lam * torch.stack(projected).mean() + torch.stack(baselines).sum()


def _source_weights(run: Path, cfg: TrainConfig, data: TaskData) -> dict[str, torch.Tensor]:
    """The source M (weights + task embeddings) of a finished run, checked to fit this run."""
    meta = load_json(run / "config.json")
    if meta.get("task_names") != data.task_names or meta.get("source_model") != cfg.source.model(data.spec).to_dict():
        raise ProjectableEdgeError(f"--init-source {run}: its source model or tasks differ from this run's "
                                   "(use the same preset and dataset)")
    t = load_tensors(run / "model.safetensors", kind="run")
    return {k: v for k, v in t.items() if k.startswith(("source.", "source_task"))}


def _dist_setup() -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return (dist.get_rank() if world > 1 else 0), world, device


@dataclass
class _Session:
    """One process's view of a run being trained."""

    cfg: TrainConfig
    data: TaskData
    work: Path
    meta: dict
    model: Trainables
    opts: dict[str, torch.optim.Optimizer]
    rank: int
    world: int
    device: torch.device
    start: int = 0
    best: dict[str, dict] = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)


def _open(cfg: TrainConfig, data_cfg: DataConfig, out: Path, resume: bool, init_source, log) -> _Session:
    """Check every input, then build the model and its optimizers, fresh or from the saved state."""
    data = load_dataset(data_cfg)  # bad input fails here, before anything is written
    source_init = _source_weights(Path(init_source), cfg, data) if init_source else None
    if out.exists():
        raise ProjectableEdgeError(f"run folder {out} already exists: choose another --out or delete it")
    work = partial_dir(out)
    if work.exists() and not resume:
        raise ProjectableEdgeError(
            f"an interrupted run was found at {work}: pass --resume to continue it, or delete that folder")
    rank, world, device = _dist_setup()
    meta = run_config(cfg, data_cfg, data)
    model = build(cfg, data)
    if source_init is not None:
        model.load_state_dict(source_init, strict=False)
        meta["init_source"] = {"run": str(init_source),
                               "weights_sha256": sha256_file(Path(init_source) / "model.safetensors")}
    model = model.to(device)
    s = _Session(cfg, data, work, meta, model, _optimizers(model, cfg), rank, world, device)
    if resume and (work / "state.safetensors").exists():
        saved = load_json(work / "config.json")
        if saved.get("train") != meta["train"] or saved.get("dataset_fingerprint") != data.fingerprint:
            raise ProjectableEdgeError(f"{work} was started with another config or dataset; "
                                       "resume with the same options or delete it")
        s.start = load_state(work / "state.safetensors", model, s.opts, s.best)
        if (work / "history.json").exists():
            s.history = list(load_json(work / "history.json")["history"])
        log(f"resuming {work} from step {s.start}")
    elif rank == 0:
        ensure_folder(work)  # 0755 whatever the umask: other users may read the run
        save_json(work / "config.json", meta)
    return s


def _step(s: _Session, ddp, step: int, amp) -> dict[str, torch.Tensor]:
    """One optimizer step of every role on the same batch; returns the training losses."""
    x, tid = _batch(s.data, s.cfg, step, s.rank, s.world)
    with amp:
        losses = ddp(x.to(s.device), tid.to(s.device), s.cfg.distill)
        total = joint_loss(losses, s.cfg.lam)
    for opt in s.opts.values():
        opt.zero_grad(set_to_none=True)
    total.backward()
    _clip(s.model, s.cfg)
    scale = _lr_scale(step, s.cfg)
    for opt in s.opts.values():
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * scale
        opt.step()
    return losses


def _validate(s: _Session, done: int, losses: dict, seconds: float) -> dict[str, float]:
    """Validation bits/dim of every role; one rule for all: keep the weights of its best step."""
    val = evaluate_roles(s.model, *s.data.splits["val"], s.data.n_tasks)
    macro = {r: float(v.mean()) for r, v in val.items()}
    s.history.append({"step": done, "train_nats": {k: float(v.detach()) for k, v in losses.items()},
                      "val_bits": macro, "seconds": seconds})
    for role in checkpointed_roles(s.model):
        if role not in s.best or macro[role] < s.best[role]["val"]:
            s.best[role] = {"val": macro[role], "step": done, "weights": snapshot(s.model, role)}
    return macro


def _finish(s: _Session, out: Path, seconds: float) -> dict:
    """Write the best weights and the summary, then rename the partial folder into place (rank 0)."""
    summary = {"steps": s.cfg.steps, "world_size": s.world, "device": str(s.device), "train_seconds": seconds,
               "best_val_bits": {r: b["val"] for r, b in s.best.items()},
               "best_step": {r: b.get("step") for r, b in s.best.items()}}
    if s.world > 1:  # DDP must have kept every rank's weights identical; check rather than assume
        total = torch.stack([p.detach().double().sum() for p in s.model.parameters()]).sum().reshape(1)
        sums = [torch.zeros_like(total) for _ in range(s.world)]
        dist.all_gather(sums, total)
        summary["rank_weight_sums"] = [float(x) for x in sums]
        summary["ranks_in_sync"] = all(torch.equal(x, sums[0]) for x in sums)
    if s.rank == 0:
        # The shipped pair (source, operator) is the projected role's best step; the source
        # role's own best step is kept under "source_best/" for its row of the table.
        final = {}
        for role in checkpointed_roles(s.model):
            if role != "source":
                final.update(s.best[role]["weights"])
        final.update({f"source_best/{k}": v for k, v in s.best["source"]["weights"].items()})
        save_tensors(s.work / "model.safetensors", final, kind="run")
        save_json(s.work / "history.json", {"history": s.history})
        save_json(s.work / "summary.json", summary)
        (s.work / "state.safetensors").unlink(missing_ok=True)
        os.replace(s.work, out)
    if s.world > 1:
        dist.barrier()
    return summary


def train(cfg: TrainConfig, data_cfg: DataConfig, out: Path, *, resume: bool = False,
          init_source: Path | None = None, progress: bool = True, log=print) -> dict:
    """Train one run into `out`. Returns the final summary (val bits per role, timing).

    init_source: a finished run whose source model M (weights + task embeddings) this run
    starts from; with cfg.freeze_source the operator then learns to project that fixed M.
    """
    out = Path(out)
    s = _open(cfg, data_cfg, out, resume, init_source, log)
    ddp = torch.nn.parallel.DistributedDataParallel(s.model) if s.world > 1 else s.model
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if s.device.type == "cuda" else nullcontext()
    t0 = time.time()
    bar = Progress(progress and s.rank == 0, cfg.steps, s.start)
    for step in range(s.start, cfg.steps):
        losses = _step(s, ddp, step, amp)
        done = step + 1
        if done % cfg.eval_every == 0 or done == cfg.steps:
            bar.update(done, _validate(s, done, losses, time.time() - t0))
        if s.rank == 0 and (done % cfg.checkpoint_every == 0) and done < cfg.steps:
            save_state(s.work / "state.safetensors", s.model, s.opts, s.best, done)
            save_json(s.work / "history.json", {"history": s.history})
    bar.close()
    return _finish(s, out, time.time() - t0)


def load_run(run: Path) -> tuple[dict, Trainables, TaskData]:
    """Load a finished run: its config, the best weights of every role, and its dataset."""
    run = Path(run)
    if not run.is_dir():
        hint = (f" (an interrupted run is at {partial_dir(run)}: resume it with --resume)"
                if partial_dir(run).exists() else "")
        raise ProjectableEdgeError(f"run folder {run} not found{hint}")
    meta = load_json(run / "config.json")
    if meta.get("format") != "projectable-edge-run":
        raise ProjectableEdgeError(f"{run / 'config.json'} is not a projectable-edge run config")
    cfg = TrainConfig.from_dict(meta["train"])
    data = load_dataset(DataConfig.from_dict(meta["data"]))
    if data.fingerprint != meta["dataset_fingerprint"]:
        raise ProjectableEdgeError(f"the dataset of {run} has changed since training (fingerprint differs)")
    model = build(cfg, data)
    t = load_tensors(run / "model.safetensors", kind="run")
    expected = model.state_dict()
    weights = {k: v for k, v in t.items() if not k.startswith("source_best/")}
    if set(weights) != set(expected) or any(weights[k].shape != expected[k].shape for k in expected):
        raise ProjectableEdgeError(f"{run / 'model.safetensors'} does not match {run / 'config.json'}")
    model.load_state_dict(weights)
    model.eval()
    return meta, model, data


def source_best(run: Path, model: Trainables) -> Trainables:
    """A copy of the model whose source is the source role's own best checkpoint (for its table row)."""
    import copy

    t = load_tensors(Path(run) / "model.safetensors", kind="run")
    m = copy.deepcopy(model)
    sd = {k[len("source_best/"):]: v for k, v in t.items() if k.startswith("source_best/")}
    m.load_state_dict(sd, strict=False)
    return m


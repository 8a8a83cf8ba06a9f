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

import gc
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
from projectable_edge.checkpoint import load_json, load_tensors, read_tensors, save_json, save_tensors
from projectable_edge.config import TrainConfig
from projectable_edge.data import SNAPSHOT, DataConfig, TaskData, load_dataset, load_splits, save_splits, shift_augment
from projectable_edge.model import ModelConfig, bits_per_dim
from projectable_edge.train_state import Progress, load_state, save_state, snapshot
from projectable_edge.trainables import SLICED, Trainables
from projectable_edge_runtime.bundle.atomic import ensure_folder
from projectable_edge_runtime.bundle.manifest import sha256_file
from projectable_edge_runtime.graphs.tokenizer import TokenizerSpec

RUN_FORMAT = 3  # 2: per-role generators, per-space mixtures, ladder; 3: second stage, split snapshot


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


def build(cfg: TrainConfig, spec: TokenizerSpec, n_tasks: int, baselines: bool = True) -> Trainables:
    ladder = {n: w.model(spec) for n, w in cfg.rungs().items()}
    return Trainables(cfg.source.model(spec), cfg.small.model(spec), n_tasks, cfg.projection,
                      seed=cfg.seed, ladder=ladder, baselines=baselines, sliced=cfg.extra_steps > 0)


STAGES = ("joint", "extra")


def stage_span(cfg: TrainConfig, stage: str) -> tuple[int, int]:
    """[first, last) global steps of a stage: joint = the source's steps, extra = the second stage."""
    return (0, cfg.steps) if stage == "joint" else (cfg.steps, cfg.steps + cfg.extra_steps)


def stage_roles(model: Trainables, stage: str) -> tuple[str, ...]:
    """The roles a stage trains: joint = all but the sliced models; extra = all but the (frozen) source."""
    if stage == "joint":
        return tuple(r for r in model.roles if r not in SLICED)
    return tuple(r for r in model.roles if r != "source")


def _optimizers(model: Trainables, cfg: TrainConfig, stage: str = "joint") -> dict[str, torch.optim.Optimizer]:
    """One AdamW per optimised unit of the stage; everything else is frozen (no gradient)."""
    p = model.role_params()
    named = {id(q): f".{n}" for n, q in model.named_parameters()}
    deltas = {i for i, n in named.items() if ".delta." in n}
    maps = {i for i, n in named.items() if ".bases." in n or ".coef." in n}
    if stage == "extra" and cfg.extra_operator != "all":  # "mixtures": only the mixture layer; "none": nothing
        maps = {i for i in maps if cfg.extra_operator == "mixtures" and ".coef." in named[i]}

    scale = cfg.projected_lr_scale if stage == "extra" else 1.0

    def operator(q):
        # The shared small-model delta learns in the second stage only (at the models' rate), so the
        # joint stage, and the source every small model starts from, are the same with or without it.
        groups = [{"params": [x for x in q if id(x) in maps], "lr": cfg.projector_lr * scale, "weight_decay": 0.0},
                  {"params": [x for x in q if id(x) in deltas and stage == "extra"], "lr": cfg.lr * scale}]
        return [g for g in groups if g["params"]]

    key = "joint" if stage == "joint" else "operator"
    groups = {key: [g for unit, q in p.items() if unit.startswith("projector") for g in operator(q)]}
    groups.update({unit: [{"params": q, "lr": cfg.lr * (cfg.sliced_lr_scale if unit in SLICED else 1.0)}]
                   for unit, q in p.items()
                   if unit.startswith(("universal", "scratch")) and (stage == "extra" or unit not in SLICED)})
    if stage == "joint" and not cfg.freeze_source:
        groups["joint"].insert(0, {"params": p["source"], "lr": cfg.lr})
    trained = {id(q) for g in groups.values() for group in g for q in group["params"]}
    for q in model.parameters():
        q.requires_grad_(id(q) in trained)
    opts = {}
    for name, g in groups.items():
        for group in g:
            group["base_lr"] = group["lr"]
        opts[f"extra-{name}" if stage == "extra" else name] = torch.optim.AdamW(
            g, betas=(0.9, 0.99), weight_decay=cfg.weight_decay)
    return opts


def _lr_scale(step: int, cfg: TrainConfig) -> float:
    """Per stage: linear warm-up, then cosine decay to 10%."""
    first, last = stage_span(cfg, "extra" if step >= cfg.steps else "joint")
    i, n = step - first, last - first
    if i < cfg.warmup_steps:
        return (i + 1) / cfg.warmup_steps
    frac = (i - cfg.warmup_steps) / max(1, n - cfg.warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))


def _clip(model: Trainables, cfg: TrainConfig) -> None:
    """Clip each role's gradient norm on its own; scratch per task, as separate models would be."""
    p = model.role_params()
    for unit, params in p.items():
        if unit != "scratch":
            torch.nn.utils.clip_grad_norm_([q for q in params if q.grad is not None], cfg.grad_clip)
    grads = [q.grad for q in p.get("scratch", ()) if q.grad is not None]
    if grads:
        norms = torch.stack([g.flatten(1).norm(dim=1) for g in grads]).norm(dim=0)  # [n_task]
        scale = (cfg.grad_clip / (norms + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(scale.view(-1, *([1] * (g.dim() - 1))))


@torch.no_grad()
def image_bits(model: Trainables, tokens: np.ndarray, task_ids: np.ndarray, roles=None,
               batch: int = 256) -> dict[str, np.ndarray]:
    """Bits/dim of every image under each role (each image scored by its own task's model): {role: [N]}."""
    was = model.training
    model.eval()
    out = {}
    device = next(model.parameters()).device
    x_all, t_all = torch.from_numpy(tokens).to(device), torch.from_numpy(task_ids).to(device)
    for role in roles or model.roles:
        out[role] = torch.cat([bits_per_dim(model.logits(role, x_all[i:i + batch], t_all[i:i + batch]),
                                            x_all[i:i + batch]) for i in range(0, len(x_all), batch)]).cpu().numpy()
    model.train(was)
    return out


def task_means(bits: np.ndarray, task_ids: np.ndarray, n_task: int) -> np.ndarray:
    """Per-task mean of per-image values: [n_task] (nan for a task without images)."""
    return np.array([bits[task_ids == t].mean() if (task_ids == t).any() else np.nan for t in range(n_task)])


def evaluate_roles(model: Trainables, tokens: np.ndarray, task_ids: np.ndarray, n_task: int,
                   roles=None, batch: int = 256) -> dict[str, np.ndarray]:
    """Per-task mean bits/dim of each role on a split: {role: [n_task]}."""
    return {r: task_means(b, task_ids, n_task) for r, b in image_bits(model, tokens, task_ids, roles, batch).items()}


def _batch(data: TaskData, cfg: TrainConfig, step: int, rank: int, world: int):
    """A deterministic function of (seed, step, rank): resuming replays the same batches."""
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * world + rank)
    tokens, task_ids = data.splits["train"]
    idx = torch.randint(len(tokens), (cfg.batch_size,), generator=g)
    x = torch.from_numpy(tokens)[idx]
    if cfg.shift:
        x = shift_augment(x, data.spec, g, max_shift=cfg.shift)
    return x, torch.from_numpy(task_ids)[idx]


def checkpointed_roles(roles) -> tuple[str, ...]:
    """Roles that keep their own best-validation weights (ladder projectors ride with 'projected')."""
    return tuple(r for r in roles if not r.startswith("projected@"))


def joint_loss(losses: dict[str, torch.Tensor], lam: float) -> torch.Tensor:
    """NLL(M) + lam * mean over sizes of NLL(P_t), plus every baseline's own loss.

    The roles share no parameters except source <- projected, so one backward gives each
    baseline exactly the gradient of its own objective. (In the second stage there is no source term.)
    """
    projected = [v for r, v in losses.items() if r.startswith("projected")]
    baselines = [v for r, v in losses.items() if r.startswith(("universal", "scratch"))]
    total = lam * torch.stack(projected).mean() + torch.stack(baselines).sum()
    return total + losses["source"] if "source" in losses else total


def _source_weights(run: Path, cfg: TrainConfig, data: TaskData) -> dict[str, torch.Tensor]:
    """The source M (weights + task embeddings) of a finished run, checked to fit this run."""
    meta = load_json(run / "config.json")
    if meta.get("task_names") != data.task_names or meta.get("source_model") != cfg.source.model(data.spec).to_dict():
        raise ProjectableEdgeError(f"--init-source {run}: its source model or tasks differ from this run's "
                                   "(use the same preset and dataset)")
    if meta.get("dataset_fingerprint") != data.fingerprint:  # its training images would hold this run's test ones
        raise ProjectableEdgeError(f"--init-source {run}: it was trained on other splits of the data (another "
                                   "--seed, split or data option, or changed images), so it has seen some of this "
                                   "run's validation and test images; pass that run's options, or train it again")
    t = load_tensors(run / "model.safetensors", kind="run")
    return {k: v for k, v in t.items() if k.startswith(("source.", "source_task"))}


def _creates_group() -> bool:
    """Whether this process (one of torchrun's) has no process group yet, so opening a run creates it."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized()


def _dist_setup() -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if _creates_group():
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


def _from_run(run: Path, cfg: TrainConfig, data: TaskData, model: Trainables) -> tuple[dict, list]:
    """Load a finished run (same joint stage: config and data) into `model` for a second stage only.

    Returns its best-step record per role (weights included) and its history.
    """
    meta, t = read_run(run)
    joint = {k: v for k, v in cfg.to_dict().items() if k not in _EXTRA_FIELDS}
    theirs = {k: v for k, v in TrainConfig.from_dict(meta["train"]).to_dict().items() if k not in _EXTRA_FIELDS}
    if joint != theirs or meta.get("dataset_fingerprint") != data.fingerprint:
        diff = sorted(k for k in joint if joint[k] != theirs.get(k))
        raise ProjectableEdgeError(f"--from-run {run}: its first stage differs from this run's "
                                   f"({', '.join(diff) or 'dataset'}); use the same options and dataset")
    if meta["train"].get("extra_steps"):
        raise ProjectableEdgeError(f"--from-run {run} already has a second stage; start from a run without one")
    mine = model.state_dict()
    weights = {k: v for k, v in t.items() if k in mine}
    missing = [k for k in mine if k not in weights and not (k.startswith("sliced.") or ".delta." in f".{k}")]
    if missing:
        raise ProjectableEdgeError(f"--from-run {run}: its weights lack {missing[:3]}; is it a run of this version?")
    model.load_state_dict(weights, strict=False)
    summary = load_json(Path(run) / "summary.json")
    best = {}
    for role, val in summary["best_val_bits"].items():
        snap = snapshot(model, role)
        if role == "source":
            snap = {k: t[f"source_best/{k}"] for k in snap}
        best[role] = {"val": val, "step": summary["best_step"][role], "weights": snap}
    return best, list(load_json(Path(run) / "history.json")["history"])


_EXTRA_FIELDS = ("extra_steps", "kd", "projected_kd", "delta", "extra_operator", "projected_lr_scale",
                 "sliced_lr_scale", "eval_every", "checkpoint_every")


def _open(cfg: TrainConfig, data_cfg: DataConfig, out: Path, resume: bool, init_source, from_run, log) -> _Session:
    """Check every input, then build the model and its optimizers, fresh or from the saved state."""
    data = load_dataset(data_cfg)  # bad input fails here, before anything is written
    source_init = _source_weights(Path(init_source), cfg, data) if init_source else None
    if from_run is not None and not cfg.extra_steps:
        raise ProjectableEdgeError("--from-run continues a finished run with a second stage: pass --extra-steps N")
    if out.exists():
        raise ProjectableEdgeError(f"run folder {out} already exists: choose another --out or delete it")
    work = partial_dir(out)
    if work.exists() and not resume:
        raise ProjectableEdgeError(
            f"an interrupted run was found at {work}: pass --resume to continue it, or delete that folder")
    rank, world, device = _dist_setup()
    meta = run_config(cfg, data_cfg, data)
    model = build(cfg, data.spec, data.n_tasks)
    best, history, start = {}, [], 0
    if source_init is not None:
        model.load_state_dict(source_init, strict=False)
        meta["init_source"] = {"run": str(init_source),
                               "weights_sha256": sha256_file(Path(init_source) / "model.safetensors")}
    if from_run is not None:
        best, history = _from_run(Path(from_run), cfg, data, model)
        start = cfg.steps
        meta["from_run"] = {"run": str(from_run), "weights_sha256": sha256_file(Path(from_run) / "model.safetensors")}
    model = model.to(device)
    state = work / "state.safetensors"
    saved_step = int(load_tensors(state, kind="train-state")["step"]) if resume and state.exists() else 0
    stage = "extra" if saved_step > cfg.steps or from_run is not None else "joint"
    s = _Session(cfg, data, work, meta, model, _optimizers(model, cfg, stage), rank, world, device, start, best, history)
    if saved_step:
        saved = load_json(work / "config.json")
        if saved.get("train") != meta["train"]:
            raise ProjectableEdgeError(f"{work} was started with another config; "
                                       "resume with the same options or delete it")
        if saved.get("dataset_fingerprint") != data.fingerprint:
            raise ProjectableEdgeError(
                f"{work} was started on other data: the dataset's images, tasks or size options "
                f"(--image-size, --rgb, --levels, --hold-out-task) differ from its start; put the "
                f"dataset back as it was and resume with the same options, or delete {work} to start over")
        s.start = load_state(state, model, s.opts, s.best)
        if (work / "history.json").exists():
            s.history = list(load_json(work / "history.json")["history"])
        log(f"resuming {work} from step {s.start}")
    elif rank == 0:
        ensure_folder(work)  # 0755 whatever the umask: other users may read the run
        save_json(work / "config.json", meta)
    return s


def _enter_extra(s: _Session) -> None:
    """Start the second stage: every role from its best step so far (the source frozen: the projected
    role's best, the one that ships), the sliced models from that source, fresh optimizers."""
    for role in checkpointed_roles(stage_roles(s.model, "joint")):
        if role != "source":
            s.model.load_state_dict(s.best[role]["weights"], strict=False)
    s.model.init_sliced()
    s.opts = _optimizers(s.model, s.cfg, "extra")


def _step(s: _Session, ddp, step: int, amp, roles: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """One optimizer step of every role of the stage on the same batch; returns the training losses."""
    x, tid = _batch(s.data, s.cfg, step, s.rank, s.world)
    with amp:
        kd = {"universal@ws+kd": s.cfg.kd, "projected": s.cfg.projected_kd} if step >= s.cfg.steps else {}
        losses = ddp(x.to(s.device), tid.to(s.device), roles, s.cfg.distill, kd)
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


def _validate(s: _Session, done: int, losses: dict, seconds: float, roles: tuple[str, ...],
              stage: str) -> dict[str, float]:
    """Validation bits/dim of the stage's roles; one rule for all: keep the weights of its best step."""
    val = evaluate_roles(s.model, *s.data.splits["val"], s.data.n_tasks, roles=roles)
    macro = {r: float(v.mean()) for r, v in val.items()}
    s.history.append({"step": done, "stage": stage, "train_nats": {k: float(v.detach()) for k, v in losses.items()},
                      "val_bits": macro, "seconds": seconds})
    for role in checkpointed_roles(roles):
        if role not in s.best or macro[role] < s.best[role]["val"]:
            s.best[role] = {"val": macro[role], "step": done, "weights": snapshot(s.model, role)}
    return macro


def _finish(s: _Session, out: Path, seconds: float) -> dict:
    """Write the best weights and the summary, then rename the partial folder into place (rank 0)."""
    summary = {"steps": s.cfg.steps, "extra_steps": s.cfg.extra_steps, "world_size": s.world,
               "device": str(s.device), "train_seconds": seconds,
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
        for role in checkpointed_roles(s.model.roles):
            if role != "source":
                final.update(s.best[role]["weights"])
        final.update({f"source_best/{k}": v for k, v in s.best["source"]["weights"].items()})
        save_tensors(s.work / "model.safetensors", final, kind="run")
        save_splits(s.work / SNAPSHOT, s.data)
        save_json(s.work / "history.json", {"history": s.history})
        save_json(s.work / "summary.json", summary)
        (s.work / "state.safetensors").unlink(missing_ok=True)
        os.replace(s.work, out)
    if s.world > 1:
        dist.barrier()
    return summary


def train(cfg: TrainConfig, data_cfg: DataConfig, out: Path, *, resume: bool = False,
          init_source: Path | None = None, from_run: Path | None = None, progress: bool = True, log=print) -> dict:
    """Train one run into `out`. Returns the final summary (val bits per role, timing).

    Two stages: `cfg.steps` joint steps (source + operators, and the baselines beside them), then
    `cfg.extra_steps` steps for every small model on the frozen source (none by default).
    init_source: a finished run whose source model M (weights + task embeddings) this run
    starts from; with cfg.freeze_source the operator then learns to project that fixed M.
    from_run: a finished run without a second stage whose every role this run starts from; only
    the second stage is trained.
    """
    out = Path(out)
    # A process group this call creates (torchrun) is destroyed here once every rank is done: a gloo
    # group left to the interpreter's exit can abort a rank ("terminate called without an active
    # exception"). Not after an error: destroying while other ranks wait in a collective can hang.
    creates_group = _creates_group()
    summary = _train(_open(cfg, data_cfg, out, resume, init_source, from_run, log), out, progress)
    if creates_group:
        gc.collect()  # the DDP wrapper sits in reference cycles and holds the group: free it first
        dist.destroy_process_group()
    return summary


def _train(s: _Session, out: Path, progress: bool) -> dict:
    """Both stages of an opened run, then its final files."""
    cfg = s.cfg
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if s.device.type == "cuda" else nullcontext()
    t0 = time.time()
    total = cfg.steps + cfg.extra_steps
    bar = Progress(progress and s.rank == 0, total, s.start)
    for stage in STAGES:
        first, last = stage_span(cfg, stage)
        if s.start >= last or first == last:
            continue
        roles = stage_roles(s.model, stage)
        if stage == "extra" and s.start <= first:
            _enter_extra(s)
            bar.update(first, _validate(s, first, {}, time.time() - t0, SLICED, stage))  # their step 0
        ddp = torch.nn.parallel.DistributedDataParallel(s.model) if s.world > 1 else s.model
        for step in range(max(first, s.start), last):
            losses = _step(s, ddp, step, amp, roles)
            done = step + 1
            if done % cfg.eval_every == 0 or done == last:
                bar.update(done, _validate(s, done, losses, time.time() - t0, roles, stage))
            if s.rank == 0 and (done % cfg.checkpoint_every == 0) and done < total:
                save_state(s.work / "state.safetensors", s.model, s.opts, s.best, done)
                save_json(s.work / "history.json", {"history": s.history})
    bar.close()
    return _finish(s, out, time.time() - t0)


def run_data(run: Path, meta: dict) -> TaskData:
    """A finished run's splits: its own snapshot, or (runs written before snapshots) the dataset, re-read."""
    spec = TokenizerSpec.from_dict(meta["tokenizer"])
    data_cfg = DataConfig.from_dict(meta["data"])
    if (Path(run) / SNAPSHOT).is_file():
        return load_splits(Path(run) / SNAPSHOT, meta["task_names"], spec, data_cfg, meta["dataset_fingerprint"])
    data = load_dataset(data_cfg)
    if data.fingerprint != meta["dataset_fingerprint"]:
        raise ProjectableEdgeError(f"the dataset of {run} has changed since training (fingerprint differs)")
    return data


def read_run(run: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """A finished run's config and weights, the weights file read once (its sha256 lands in the config)."""
    meta = read_config(run)
    tensors, meta["weights_sha256"] = read_tensors(Path(run) / "model.safetensors", kind="run")
    return meta, tensors


def read_config(run: Path) -> dict:
    """A finished run's config, checked (format, version, task names, model sizes), without its weights."""
    run = Path(run)
    if not run.is_dir():
        hint = (f" (an interrupted run is at {partial_dir(run)}: resume it with --resume)"
                if partial_dir(run).exists() else "")
        raise ProjectableEdgeError(f"run folder {run} {'is a file, not a folder' if run.exists() else 'not found'}"
                                   f"{hint}; give a folder written by `projectable-edge train`")
    meta = load_json(run / "config.json")
    if meta.get("format") != "projectable-edge-run":
        raise ProjectableEdgeError(f"{run / 'config.json'} is not a projectable-edge run config")
    version = meta.get("format_version", 0)
    if type(version) is not int or version < 0:
        raise ProjectableEdgeError(f"{run / 'config.json'}: format_version must be a whole number, got {version!r}; "
                                   "the file was edited: train the run again")
    if version > RUN_FORMAT:
        raise ProjectableEdgeError(f"{run} was written by a newer projectable-edge (run format "
                                   f"{version}, this one reads up to {RUN_FORMAT}): upgrade it")
    _check_models(run / "config.json", meta)
    return meta


def _check_models(path: Path, meta: dict) -> None:
    """A run config's task names must be names, and the model sizes it records (bundles copy them) those its
    'train' and 'tokenizer' fields give."""
    names = meta.get("task_names")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise ProjectableEdgeError(f"{path}: 'task_names' must be a list of one or more names, got {names!r}; "
                                   "copy the run folder again")
    try:
        cfg, spec = TrainConfig.from_dict(meta.get("train")), TokenizerSpec.from_dict(meta.get("tokenizer"))
        DataConfig.from_dict(meta.get("data"))
    except ProjectableEdgeError as e:
        raise ProjectableEdgeError(f"{path}: {e}; copy the run folder again") from None
    for key, want in (("source_model", cfg.source.model(spec)), ("small_model", cfg.small.model(spec))):
        try:
            got = ModelConfig.from_dict(meta.get(key)).to_dict()
        except ProjectableEdgeError as e:
            raise ProjectableEdgeError(f"{path}: '{key}': {e}; copy the run folder again") from None
        diff = [f"{k} {got[k]} (expected {v})" for k, v in want.to_dict().items() if got[k] != v]
        if diff:
            raise ProjectableEdgeError(f"{path}: '{key}' disagrees with its 'train' and 'tokenizer' fields: "
                                       f"{', '.join(diff)}; copy the run folder again")
    recorded, want = meta.get("projection", {}), cfg.projection.to_dict()  # older runs lack newer options
    if not isinstance(recorded, dict) or any(k not in want or recorded[k] != want[k] for k in recorded):
        raise ProjectableEdgeError(f"{path}: 'projection' is not the operator its 'train' field gives; "
                                   "copy the run folder again")
    if meta.get("ladder_models", {}) != {n: w.model(spec).to_dict() for n, w in cfg.rungs().items()}:
        raise ProjectableEdgeError(f"{path}: 'ladder_models' are not the sizes its 'train' field gives; "
                                   "copy the run folder again")


def load_run(run: Path, *, data: bool = True, baselines: bool = True) -> tuple[dict, Trainables, TaskData | None]:
    """Load a finished run: its config, the best weights of every role, and its splits.

    data=False skips the splits (returns None); baselines=False builds and loads only the source and
    the operators, which is all that projecting a task needs.
    """
    run = Path(run)
    meta, t = read_run(run)
    cfg = TrainConfig.from_dict(meta["train"])
    model = build(cfg, TokenizerSpec.from_dict(meta["tokenizer"]), len(meta["task_names"]), baselines)
    expected = model.state_dict()
    weights = {k: v for k, v in t.items() if k in expected}
    extra = baselines and any(k not in expected and not k.startswith("source_best/") for k in t)
    if extra or set(weights) != set(expected) or any(weights[k].shape != expected[k].shape for k in expected):
        raise ProjectableEdgeError(f"{run / 'model.safetensors'} does not match {run / 'config.json'}")
    model.load_state_dict(weights)
    model.eval()
    return meta, model, (run_data(run, meta) if data else None)


def source_best(run: Path, model: Trainables) -> Trainables:
    """A copy of the model whose source is the source role's own best checkpoint (for its table row)."""
    import copy

    t = load_tensors(Path(run) / "model.safetensors", kind="run")
    m = copy.deepcopy(model)
    sd = {k[len("source_best/"):]: v for k, v in t.items() if k.startswith("source_best/")}
    m.load_state_dict(sd, strict=False)
    return m


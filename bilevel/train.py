"""One training loop for every meta-learner: meta-batches, validation, checkpoints, logs.

``fit`` trains a :class:`bilevel.learner.MetaLearner` on episodes and writes, under ``out``:

* ``checkpoint.pt`` — everything needed to resume exactly (learner, optimizer, scheduler, RNG
  states, sampler position, best validation score), written atomically every
  ``checkpoint_every`` iterations; ``resume=True`` continues from it;
* ``best.pt`` — the learner with the best validation score so far (atomic);
* ``log.csv`` (and TensorBoard events under ``tb/`` when tensorboard is installed);
* at the end: ``model.pt`` (loadable with :func:`bilevel.load`), ``metrics.json`` and
  ``curves.png``.

Data parallelism (:mod:`bilevel.distributed`): under ``torchrun`` (or ``--nproc``) ``fit``
creates the process group (gloo on CPU, NCCL on GPU). Meta-batch ``it`` is the same on every
rank (episodes depend only on the seed, the iteration and the episode index); rank r takes
episodes [r·B/W, (r+1)·B/W) and the meta-gradients are averaged with one all-reduce after the
outer backward (:func:`meta_gradient`), so W ranks follow the same trajectory as one process
(up to floating-point summation order). Only rank 0 touches ``out``: it writes every file and
reads the checkpoint to resume, then broadcasts it (no shared file system needed). A run is
resumed with the number of processes that wrote it.
"""
from __future__ import annotations

import csv
import json
import math
import os
import random
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from bilevel.data import Episodes, SinusoidTasks, load_splits, make_sampler
from bilevel.data.augment import Augment
from bilevel.data.synthetic import seed_from
from bilevel.data.transforms import example_shape as _example_shape
from bilevel.distributed import average_gradients, broadcast_module, broadcast_object, init_from_env, leave_group
from bilevel.distributed import world as _world
from bilevel.distributed import world_size_mismatch
from bilevel.evaluation import mean_ci
from bilevel.io import _resolve_factory, atomic_save, save_model
from bilevel.learner import MetaLearner
from bilevel.parallel import TaskThreads

CHECKPOINT = "checkpoint.pt"
BEST = "best.pt"
MODEL = "model.pt"
LOG = "log.csv"
METRICS = "metrics.json"
LOG_FIELDS = ["iteration", "split", "loss", "metric", "ci95", "lr", "seconds"]


@dataclass
class DataConfig:
    """Which episodes to train and evaluate on.

    Attributes:
        dataset: a name from :func:`bilevel.data.available_datasets` (``glyphs`` is offline).
        data_root: folder with the dataset files (``--data-root``); ``None`` for built-ins.
        ways, shots, queries: N-way K-shot episodes with Q queries per class at evaluation.
        train_shots: K at training time (MetaOptNet trains with a higher shot); default ``shots``.
        train_ways: N at training time; default ``ways``.
        meta_batch: B episodes per outer step.
        augment: MetaOptNet-style augmentation (random crop, flip, colour jitter) for training.
        options: dataset-specific options (e.g. ``{"rotations": True, "split_by": "alphabet"}``).
    """

    dataset: str = "glyphs"
    data_root: str | None = None
    ways: int = 5
    shots: int = 1
    queries: int = 15
    train_shots: int | None = None
    train_ways: int | None = None
    meta_batch: int = 4
    augment: bool = False
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainConfig:
    """How to train.

    Attributes:
        iterations: number of outer steps.
        optimizer: ``"adam"`` (MAML, Meta-SGD, …) or ``"sgd"`` (SGD with Nesterov momentum and
            weight decay, MetaOptNet).
        lr, momentum, nesterov, weight_decay: outer optimizer settings.
        lr_schedule: piecewise-constant multipliers ``[(iteration, factor), ...]``: the learning
            rate is ``lr * factor`` from that iteration on (MetaOptNet: 0.06, 0.012, 0.0024).
        grad_clip: clip the meta-gradient norm (None: no clipping).
        val_every, val_episodes: validation period and size; the best model is kept.
        test_episodes: episodes of the final test evaluation (mean ± 95% CI).
        checkpoint_every: checkpoint period in iterations.
        log_every: period of training-log rows (running means over the period).
        seed: seeds model initialisation and the episode streams.
        device: ``"cpu"``, ``"cuda"``, …
        out: output folder.
        progress: show a progress bar; tensorboard: also log TensorBoard events.
        threads: torch CPU threads (``None``: leave torch's default).
        task_threads: split each meta-batch over this many CPU threads, one learner replica
            each (:class:`bilevel.parallel.TaskThreads`); with several cores this beats
            intra-op parallelism on small episodes. The torch threads are then shared
            among them (``threads // task_threads`` each, at least 1).
    """

    iterations: int = 1000
    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 0.0
    lr_schedule: list[tuple[int, float]] = field(default_factory=list)
    grad_clip: float | None = None
    val_every: int = 500
    val_episodes: int = 100
    test_episodes: int = 600
    checkpoint_every: int = 100
    log_every: int = 10
    seed: int = 0
    device: str = "cpu"
    out: str = "runs/bilevel"
    progress: bool = True
    tensorboard: bool = True
    threads: int | None = None
    task_threads: int = 1


class _PiecewiseLR:
    """LambdaLR multiplier: ``factor`` of the last schedule entry whose iteration is reached."""

    def __init__(self, schedule: list[tuple[int, float]]) -> None:
        self.schedule = sorted((int(i), float(f)) for i, f in schedule)

    def __call__(self, it: int) -> float:
        factor = 1.0
        for start, f in self.schedule:
            if it >= start:
                factor = f
        return factor


def _share(meta_batch: int, rank: int, world: int) -> list[int]:
    if meta_batch % world:
        raise ValueError(
            f"meta_batch={meta_batch} is not divisible by the number of processes ({world}); "
            "choose a meta-batch that is a multiple of --nproc"
        )
    per = meta_batch // world
    return list(range(rank * per, (rank + 1) * per))


def _validate(data: DataConfig, cfg: TrainConfig) -> None:
    for name in ("iterations", "val_every", "val_episodes", "test_episodes", "checkpoint_every", "log_every"):
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    if cfg.optimizer not in ("adam", "sgd"):
        raise ValueError(f"optimizer must be 'adam' or 'sgd', got {cfg.optimizer!r}")
    if not cfg.lr > 0 or not math.isfinite(cfg.lr):
        raise ValueError(f"lr must be a finite number > 0, got {cfg.lr!r}")
    for name in ("ways", "shots", "queries", "meta_batch"):
        v = getattr(data, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")


@dataclass
class Samplers:
    train: Any
    val: Any
    test: Any
    example_shape: list[int]
    transform: dict[str, Any]
    task: str


def build_samplers(data: DataConfig, seed: int, splits: tuple[str, ...] = ("train", "val", "test")) -> Samplers:
    """Load the dataset splits once and build the train/val/test episode samplers.

    The three samplers use distinct episode streams derived from ``seed``; the validation and
    test episodes are the same in every run with that seed.
    """
    ds = load_splits(data.dataset, data.data_root, splits, **data.options)
    first = ds[splits[0]]
    regression = isinstance(first, SinusoidTasks)
    ways = None if regression else data.ways
    train_ways = None if regression else (data.train_ways or data.ways)
    augment = None
    if data.augment and not regression:
        augment = Augment.metaoptnet(int(first.images.shape[-1]))
    out: dict[str, Any] = {}
    for split in splits:
        if split == "train":
            out[split] = make_sampler(ds[split], ways=train_ways, shots=data.train_shots or data.shots,
                                      queries=data.queries, meta_batch=data.meta_batch, seed=seed, augment=augment)
        else:
            # evaluation streams are indexed by episode (meta_batch 1): independent of --meta-batch
            out[split] = make_sampler(ds[split], ways=ways, shots=data.shots, queries=data.queries,
                                      meta_batch=1, seed=seed + {"val": 1, "test": 2}[split])
    spec = first.transform
    shape = list(_example_shape(spec)) if not regression else [1]
    return Samplers(out.get("train"), out.get("val"), out.get("test"), shape, dict(spec),
                    "regression" if regression else "classification")


def evaluate_learner(learner: MetaLearner, sampler: Any, episodes: int, *, device: str | torch.device = "cpu",
                     progress: bool = False, desc: str = "evaluate", chunk: int = 8) -> dict[str, Any]:
    """Mean ± 95% CI (1.96·std/√N) of the learner's metric over ``episodes`` episodes.

    Episode e (e = 0, …, episodes − 1) is episode 0 of meta-batch e of ``sampler``: the same
    episodes in every call, for every learner and whatever the training meta-batch, given the
    seed. They are run ``chunk`` at a time; with several processes each rank evaluates every
    world-th episode and the values are gathered.
    """
    rank, size = _world()
    mine = [e for e in range(episodes) if e % size == rank]
    values: list[Tensor] = []
    positions: list[int] = []
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=episodes, desc=desc, leave=False)
    was_training = learner.training
    learner.eval()
    try:
        for start in range(0, len(mine), chunk):
            es = mine[start:start + chunk]
            positions += es
            parts = [sampler.sample(e, indices=[0]) for e in es]
            ep = Episodes(*(torch.cat(field) for field in zip(*parts))).to(device)
            with torch.no_grad():
                _, metric = learner.meta_loss(ep, train=False)
            values.append(metric.detach().double().cpu())
            if bar is not None:
                bar.update(len(parts) * size)
    finally:
        learner.train(was_training)
        if bar is not None:
            bar.close()
    local = torch.cat(values) if values else torch.zeros(0, dtype=torch.float64)
    if size > 1:  # gather the values of all ranks, back in episode order (as one process has them)
        gathered: list[Any] = [None] * size
        dist.all_gather_object(gathered, (positions, local))
        local = torch.empty(episodes, dtype=torch.float64)
        for pos, vals in gathered:
            local[pos] = vals
    mean, ci = mean_ci(local)
    metric_name = "mse" if learner.task == "regression" else "accuracy"
    return {"metric": metric_name, "mean": mean, "ci95": ci, "episodes": int(local.numel())}


class _Logger:
    """CSV (+ TensorBoard) log written by rank 0; resuming drops rows past the checkpoint."""

    def __init__(self, out: Path, enabled: bool, tensorboard: bool, resume_from: int | None) -> None:
        self.enabled = enabled
        self.path = out / LOG
        self.tb = None
        if not enabled:
            return
        rows: list[dict[str, str]] = []
        if resume_from is not None and self.path.exists():
            with open(self.path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["iteration"]) <= resume_from]
        tmp = self.path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, LOG_FIELDS)
            w.writeheader()
            w.writerows(rows)
        os.replace(tmp, self.path)
        self.file = open(self.path, "a", newline="")
        self.writer = csv.DictWriter(self.file, LOG_FIELDS)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                warnings.warn("tensorboard is not installed: logging to CSV only (pip install tensorboard)", stacklevel=3)
            else:
                self.tb = SummaryWriter(str(out / "tb"), purge_step=resume_from + 1 if resume_from is not None else None)

    def log(self, iteration: int, split: str, loss: float, metric: float, ci95: float, lr: float, seconds: float) -> None:
        if not self.enabled:
            return
        self.writer.writerow({"iteration": iteration, "split": split, "loss": f"{loss:.6g}", "metric": f"{metric:.6g}",
                              "ci95": f"{ci95:.6g}", "lr": f"{lr:.6g}", "seconds": f"{seconds:.3f}"})
        self.file.flush()
        if self.tb is not None:
            if not math.isnan(loss):
                self.tb.add_scalar(f"{split}/loss", loss, iteration)
            self.tb.add_scalar(f"{split}/metric", metric, iteration)
            self.tb.add_scalar("lr", lr, iteration)

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.tb is not None:
                self.tb.close()


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _comparable(d: dict[str, Any]) -> Any:
    return json.loads(json.dumps(d, default=str))


def meta_gradient(learner: MetaLearner, episodes: Any, params: list[Tensor], threads: TaskThreads | None = None) -> Tensor:
    """Set ``p.grad`` to the meta-gradient of the whole meta-batch, averaged over the ranks.

    Invariant: with this rank's B/W episodes, ``p.grad = 1/W Σ_r ∇_p meta_loss_r`` =
    ∇_p (1/B Σ_j E_j), the gradient one process computes on all B episodes (Franceschi et al.
    2018, eq. (3.1)); the average is taken after the outer backward, so any hypergradient
    strategy composes with it (:func:`bilevel.distributed.average_gradients`).

    Args:
        learner: the meta-learner; ``learner.meta_loss(episodes, train=True)``.
        episodes: this rank's share of the meta-batch.
        params: the outer parameters (same order on every rank); their ``.grad`` is replaced.
        threads: run this rank's episodes on several CPU threads (:class:`bilevel.parallel.TaskThreads`).

    Returns:
        float64 [2]: the meta-loss and the metric, averaged over the whole meta-batch.
    """
    for p in params:
        p.grad = None
    if threads is not None and threads.workers > 1:
        loss, metric, grads = threads.meta_gradient(episodes, train=True)
        by_id = {id(p): g for p, g in zip(learner.parameters(), grads)}
        for p in params:
            p.grad = by_id.get(id(p))
    else:
        loss, metric = learner.meta_loss(episodes, train=True)
        loss.backward()
    stats = torch.stack([loss.detach().double(), metric.detach().double().mean()])
    averaged = average_gradients(params, stats)
    assert averaged is not None
    return averaged


def fit(
    factory: str,
    learner_config: dict[str, Any],
    data: DataConfig,
    cfg: TrainConfig,
    *,
    resume: bool | str = False,
) -> dict[str, Any]:
    """Meta-train a learner, validate it, test it and save everything under ``cfg.out``.

    Invariant: the run is a pure function of (factory, learner_config, data, cfg): episodes of
    iteration ``it`` depend only on ``cfg.seed`` and ``it``, and a run resumed from a
    checkpoint (``resume=True``) ends with exactly the parameters of an uninterrupted run.

    Args:
        factory: ``"module:Class"`` of a :class:`MetaLearner` (e.g. ``"learners.maml:MAML"``).
        learner_config: constructor kwargs; ``example_shape`` and ``ways`` are filled in from
            the data unless given.
        data: the episodes (:class:`DataConfig`).
        cfg: the training settings (:class:`TrainConfig`).
        resume: continue from ``out/checkpoint.pt`` (its configuration must match, except
            ``iterations``, which may be extended); ``"auto"``: resume if there is a
            checkpoint, else start (used for workers restarted by torchrun's ``--max-restarts``).

    Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) the process group is created
    here and destroyed at the end (:func:`bilevel.distributed.init_from_env`); an existing
    process group is used as it is. ``data.meta_batch`` must then be a multiple of the number
    of processes, and ``resume`` needs the number of processes that wrote the checkpoint.

    Returns:
        The content of ``metrics.json``: ``{"test": {"metric", "mean", "ci95", "episodes"},
        "val": {...best...}, "train": {...}, "iterations", "wall_seconds"}``.
    """
    _validate(data, cfg)
    if resume not in (True, False, "auto"):
        raise ValueError(f"resume must be True, False or 'auto', got {resume!r}")
    device, owned = init_from_env(cfg.device)
    finished = False
    try:
        result = _fit(factory, learner_config, data, cfg, device, resume)
        finished = True
        return result
    finally:
        if owned:
            leave_group(synchronize=finished)


def _fit(factory: str, learner_config: dict[str, Any], data: DataConfig, cfg: TrainConfig, device: torch.device,
         resume: bool | str) -> dict[str, Any]:
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    if isinstance(cfg.task_threads, bool) or not isinstance(cfg.task_threads, int) or cfg.task_threads < 1:
        raise ValueError(f"task_threads must be an integer >= 1, got {cfg.task_threads!r}")
    if cfg.task_threads > 1:
        torch.set_num_threads(max(1, (cfg.threads or torch.get_num_threads()) // cfg.task_threads))
    rank, world = _world()
    out = Path(cfg.out)
    share = _share(data.meta_batch, rank, world)
    samplers = build_samplers(data, cfg.seed)
    learner_config = dict(learner_config)
    learner_config.setdefault("example_shape", samplers.example_shape)
    learner_config.setdefault("ways", None if samplers.task == "regression" else (data.train_ways or data.ways))

    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    learner = _resolve_factory(factory)(**learner_config)
    if not isinstance(learner, MetaLearner):
        raise TypeError(f"{factory} must build a bilevel.learner.MetaLearner, got {type(learner).__name__}")
    if learner.task != samplers.task:
        raise ValueError(f"{factory} is a {learner.task} learner but dataset {data.dataset!r} is {samplers.task}")
    learner.to(device)
    broadcast_module(learner)  # every rank starts from rank 0's initialisation (as DDP does)
    if world > 1:  # independent global RNG streams per rank (dropout, DropBlock); episodes do not use them
        torch.manual_seed(seed_from("rank", cfg.seed, rank))
        random.seed(seed_from("rank", "python", cfg.seed, rank))
        np.random.seed(seed_from("rank", "numpy", cfg.seed, rank) % 2**32)
    params = [p for p in learner.parameters() if p.requires_grad]
    if cfg.optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _PiecewiseLR(cfg.lr_schedule))

    run_identity = _comparable({"factory": factory, "learner_config": learner_config, "data": asdict(data),
                                "train": {k: v for k, v in asdict(cfg).items() if k not in ("iterations", "progress", "tensorboard", "out", "device", "threads", "task_threads")},
                                "world_size": world})
    start, best, elapsed = 0, {"mean": None, "iteration": None}, 0.0
    running = [0.0, 0.0, 0]  # sums of train loss and metric since the last log row, and their count
    ckpt_path = out / CHECKPOINT
    # Only rank 0 reads the output folder; the others get what it found (no shared file system needed).
    exists, ckpt = False, None
    if rank == 0:
        exists = ckpt_path.exists()
        if resume and exists:
            ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    exists, ckpt = broadcast_object((exists, ckpt))
    if resume == "auto":
        resume = exists
    if resume:
        if not exists:
            raise FileNotFoundError(f"--resume: no checkpoint at {ckpt_path}; start a new run without --resume")
        written_by = ckpt["identity"].get("world_size", 1)
        if written_by != world:
            raise ValueError(world_size_mismatch(out, written_by, world))
        mismatch = [k for k in run_identity if ckpt["identity"].get(k) != run_identity[k]]
        if mismatch:
            detail = "; ".join(f"{k}: checkpoint {ckpt['identity'].get(k)!r} vs now {run_identity[k]!r}" for k in mismatch)
            raise ValueError(f"--resume: the checkpoint in {out} was written by a different run ({detail})")
        learner.load_state_dict(ckpt["learner"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        samplers.train.load_state_dict(ckpt["sampler"])
        _set_rng_state(ckpt["rng"][rank] if isinstance(ckpt["rng"], list) else ckpt["rng"])
        start, best, elapsed = ckpt["iteration"], ckpt["best"], ckpt["elapsed"]
        running = ckpt["running"]
        del ckpt
    elif exists:
        raise FileExistsError(f"{out} already holds a run (checkpoint.pt); pass --resume to continue it or choose another --out")
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    logger = _Logger(out, rank == 0, cfg.tensorboard, start if resume else None)

    def checkpoint(iteration: int) -> None:
        rngs: Any = _rng_state()
        if world > 1:
            gathered: list[Any] = [None] * world
            dist.all_gather_object(gathered, rngs)
            rngs = gathered
        if rank == 0:
            atomic_save({"identity": run_identity, "iteration": iteration, "learner": learner.state_dict(),
                         "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                         "sampler": samplers.train.state_dict(), "rng": rngs, "best": best,
                         "running": running, "elapsed": elapsed + time.perf_counter() - t_start}, ckpt_path)

    bar = None
    if cfg.progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.iterations, initial=start, desc=f"train {type(learner).__name__}", dynamic_ncols=True)
    t_start = time.perf_counter()
    last_val: dict[str, Any] | None = None
    learner.train()
    task_threads = TaskThreads(learner, cfg.task_threads) if cfg.task_threads > 1 else None
    try:
        for it in range(start, cfg.iterations):
            samplers.train.iteration = it
            episodes = samplers.train.sample(it, indices=share).to(device)
            stats = meta_gradient(learner, episodes, params, task_threads)
            if not math.isfinite(float(stats[0])):  # the mean over all ranks: every rank stops here
                raise FloatingPointError(
                    f"meta-loss is {float(stats[0])} at iteration {it + 1}; lower the learning rates or inspect the data. "
                    f"The last good checkpoint is {ckpt_path}"
                )
            if cfg.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            sched.step()
            samplers.train.iteration = it + 1
            running = [running[0] + float(stats[0]), running[1] + float(stats[1]), running[2] + 1]
            done = it + 1
            if done % cfg.log_every == 0 or done == cfg.iterations:
                mean_loss, mean_metric = running[0] / running[2], running[1] / running[2]
                logger.log(done, "train", mean_loss, mean_metric, float("nan"), opt.param_groups[0]["lr"],
                           elapsed + time.perf_counter() - t_start)
                if bar is not None:
                    post = {"loss": f"{mean_loss:.4f}", learner_metric(learner): f"{mean_metric:.4f}"}
                    if last_val is not None:
                        post["val"] = f"{last_val['mean']:.4f}"
                    bar.set_postfix(post)
                running = [0.0, 0.0, 0]
            if done % cfg.val_every == 0 or done == cfg.iterations:
                last_val = evaluate_learner(learner, samplers.val, cfg.val_episodes, device=device)
                logger.log(done, "val", float("nan"), last_val["mean"], last_val["ci95"], opt.param_groups[0]["lr"],
                           elapsed + time.perf_counter() - t_start)
                better = best["mean"] is None or (
                    last_val["mean"] < best["mean"] if learner.task == "regression" else last_val["mean"] > best["mean"]
                )
                if better:
                    best = {**last_val, "iteration": done}
                    if rank == 0:
                        atomic_save(learner.state_dict(), out / BEST)
            if done % cfg.checkpoint_every == 0 or done == cfg.iterations:
                checkpoint(done)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        if task_threads is not None:
            task_threads.close()
        logger.close()

    wall = elapsed + time.perf_counter() - t_start
    best_state = None
    if rank == 0 and (out / BEST).exists():
        best_state = torch.load(out / BEST, map_location="cpu", weights_only=True)
    best_state = broadcast_object(best_state)
    if best_state is not None:
        learner.load_state_dict(best_state)
    test = evaluate_learner(learner, samplers.test, cfg.test_episodes, device=device, progress=cfg.progress, desc="test")
    metrics = {"test": test, "val": {k: v for k, v in best.items()}, "iterations": cfg.iterations,
               "wall_seconds": wall, "world_size": world, "learner": type(learner).__name__, "dataset": data.dataset}
    if rank == 0:
        save_model(out / MODEL, factory=factory, config=_comparable(learner.config), state=learner.state_dict(),
                   transform=samplers.transform,
                   metadata={"dataset": data.dataset, "ways": data.ways, "shots": data.shots, "task": samplers.task,
                             "test": test})
        tmp = out / (METRICS + ".tmp")
        tmp.write_text(json.dumps(metrics, indent=2))
        os.replace(tmp, out / METRICS)
        from bilevel.plot import plot_run

        plot_run(out)
    return metrics


def learner_metric(learner: MetaLearner) -> str:
    return "mse" if learner.task == "regression" else "acc"


def evaluate_model(path: str | os.PathLike, data: DataConfig, episodes: int, *, seed: int = 0, device: str = "cpu",
                   overrides: dict[str, Any] | None = None, progress: bool = True) -> dict[str, Any]:
    """Evaluate a saved ``model.pt`` on the test split: mean ± 95% CI over ``episodes`` episodes.

    Args:
        path: a ``model.pt`` written by :func:`fit` (or its folder).
        data: test episodes (dataset, ways, shots, queries).
        episodes: number of test episodes.
        seed: the test stream is that of a training run with this seed.
        overrides: learner config entries to change (e.g. ``{"eval_steps": 10}``).
    """
    from bilevel.io import load

    p = Path(path)
    if p.is_dir():
        p = p / MODEL
    model = load(p, device=device, config_overrides=overrides)
    learner = model.learner
    if not isinstance(learner, MetaLearner):
        raise TypeError(f"{p} does not hold a bilevel MetaLearner")
    samplers = build_samplers(data, seed, ("test",))
    return evaluate_learner(learner, samplers.test, episodes, device=device, progress=progress)


__all__ = ["DataConfig", "Samplers", "TrainConfig", "build_samplers", "evaluate_learner", "evaluate_model", "fit",
           "meta_gradient"]

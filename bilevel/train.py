"""The meta-training loop: one loop for every registered learner.

``fit`` trains a :class:`bilevel.learner.MetaLearner` on episodes and writes, under ``out``
(a :class:`bilevel.run_folder.RunFolder`: locked, never overwritten):

* ``config.yaml`` at the start (every resolved option, the command, versions);
* ``checkpoint.pt`` every ``checkpoint_every`` iterations (:mod:`bilevel.checkpoint`:
  everything needed to resume exactly); ``best.pt`` — the best validation state so far;
* ``log.csv`` and TensorBoard events (:mod:`bilevel.run_log`);
* at the end: ``model.pt`` (:func:`bilevel.load`), ``metrics.json`` and ``curves.png``.

Validation, test and ``bilevel <method> eval`` use the one evaluator
(:func:`bilevel.evaluation.evaluate_learner`).

Data parallelism (:mod:`bilevel.distributed`): under ``torchrun`` (or ``--nproc``) rank r takes
episodes [r·B/W, (r+1)·B/W) of the same meta-batch and the meta-gradients are averaged after the
outer backward (:func:`meta_gradient`), so W ranks follow one process's trajectory; only rank 0
touches ``out``. A run is resumed with the number of processes that wrote it.
"""
from __future__ import annotations

import math
import random
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from bilevel import options as opts
from bilevel import registry
from bilevel._atomic import atomic_save, atomic_write_json
from bilevel.checkpoint import Progress, restore_run, save_run
from bilevel.data.synthetic import seed_from
from bilevel.distributed import broadcast_module, broadcast_object, init_from_env, leave_group, on_rank0
from bilevel.distributed import world as _world
from bilevel.evaluation import evaluate_learner, evaluate_model
from bilevel.io import read_torch_file, save_learner
from bilevel.learner import MetaLearner
from bilevel.options import OptionError
from bilevel.parallel import TaskThreads, meta_gradient
from bilevel.run_config import DataConfig, PiecewiseLR, Samplers, TrainConfig, build_samplers
from bilevel.run_folder import RunFolder
from bilevel.run_log import RunLog, replay_warnings
from bilevel.solve import collect_solve_info, worst_residuals

CHECKPOINT = "checkpoint.pt"
BEST = "best.pt"
MODEL = "model.pt"
METRICS = "metrics.json"

# Re-exported: a run's configuration (bilevel.run_config), evaluate_model (bilevel.evaluation) and
# meta_gradient (bilevel.parallel), the pieces the loop is made of.
__all__ = ["DataConfig", "Samplers", "TrainConfig", "TrainingDiverged", "build_samplers", "evaluate_model", "fit",
           "meta_gradient"]


class TrainingDiverged(FloatingPointError):
    """The meta-loss or an inner loss became non-finite during training (a run error, not bad usage)."""


def _share(meta_batch: int, rank: int, world: int) -> list[int]:
    if meta_batch % world:
        raise OptionError("meta_batch", f"meta_batch={meta_batch} is not divisible by the number of processes ({world}); "
                          "choose a meta-batch that is a multiple of --nproc")
    per = meta_batch // world
    return list(range(rank * per, (rank + 1) * per))


# ----------------------------------------------------------------------------- the run
def _is_better(value: float, best: float | None, task: str) -> bool:
    return best is None or (value < best if task == "regression" else value > best)


def _identity(name: str, learner: MetaLearner, data: DataConfig, cfg: TrainConfig, world: int) -> dict[str, Any]:
    """What must be equal for a checkpoint to belong to this run (JSON-like)."""
    train = {k: v for k, v in opts.to_json(cfg).items()
             if k not in ("iterations", "progress", "tensorboard", "out", "device", "threads", "task_threads")}
    return {"learner": name, **learner.to_json(), "data": opts.to_json(data), "train": train, "world_size": world}


def _resolve(learner: str | type[MetaLearner]) -> tuple[str, type[MetaLearner]]:
    name = learner if isinstance(learner, str) else registry.name_of(learner)
    entry = registry.get_learner(name)
    if not entry.is_meta_learner:
        raise TypeError(f"learner {name!r} ({entry.target}) is not a bilevel.learner.MetaLearner; fit trains MetaLearners")
    return name, entry.factory


def fit(
    learner: str | type[MetaLearner],
    options: Mapping[str, Any] | Any,
    data: DataConfig,
    cfg: TrainConfig,
    *,
    resume: bool | str = False,
    command: list[str] | None = None,
) -> dict[str, Any]:
    """Meta-train a registered learner, validate it, test it and save everything under ``cfg.out``.

    Invariant: the run is a pure function of (learner, options, data, cfg): episodes of
    iteration ``it`` depend only on ``cfg.seed`` and ``it``, and a run resumed from a
    checkpoint (``resume=True``) ends with exactly the parameters of an uninterrupted run.

    Args:
        learner: a registered name (``"maml"``) or a registered MetaLearner class.
        options: the learner's ``Config`` instance, or a mapping of its fields (Python values).
        data: the episodes (:class:`DataConfig`).
        cfg: the training settings (:class:`TrainConfig`).
        resume: continue from ``out/checkpoint.pt`` (its run identity must match; ``iterations``
            may be extended, never shortened below the checkpoint); ``"auto"``: resume if there
            is a checkpoint, else start (workers restarted by torchrun's ``--max-restarts``).
        command: the command line recorded in ``config.yaml`` (default ``sys.argv``).

    Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) the process group is created
    here and destroyed at the end (:func:`bilevel.distributed.init_from_env`); an existing
    process group is used as it is. ``data.meta_batch`` must then be a multiple of the number
    of processes, and ``resume`` needs the number of processes that wrote the checkpoint.

    Returns:
        The content of ``metrics.json``: ``{"test": {"metric", "mean", "ci95", "median",
        "episodes", "diverged"}, "val": {...best...}, "iterations", "wall_seconds", ...}``.

    Raises:
        OptionError / RunFolderError / CheckpointError: bad options, output folder or checkpoint.
        TrainingDiverged: a non-finite meta-loss or inner loss (the last checkpoint stays intact).
    """
    if resume not in (True, False, "auto"):
        raise ValueError(f"resume must be True, False or 'auto', got {resume!r}")
    name, cls = _resolve(learner)
    config = options if isinstance(options, cls.Config) else cls.Config(**dict(options))
    cfg = cfg.resolved(cls)
    device, owned = init_from_env(cfg.device)
    finished = False
    folder: RunFolder | None = None
    try:
        def open_folder() -> tuple[RunFolder, bool]:
            want = (Path(cfg.out) / CHECKPOINT).exists() if resume == "auto" else bool(resume)
            f = RunFolder(cfg.out, resume=want, command=command)
            f.acquire()
            return f, want

        opened = on_rank0(open_folder)
        folder, resumed = opened if opened is not None else (None, None)
        resumed = broadcast_object(resumed)
        result = _fit(name, cls, config, data, cfg, device, bool(resumed), folder)
        finished = True
        return result
    finally:
        if folder is not None:
            folder.release()
        if owned:
            leave_group(synchronize=finished)


def _fit(name: str, cls: type[MetaLearner], config: Any, data: DataConfig, cfg: TrainConfig, device: torch.device,
         resume: bool, folder: RunFolder | None) -> dict[str, Any]:
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    if cfg.task_threads > 1:
        torch.set_num_threads(max(1, (cfg.threads or torch.get_num_threads()) // cfg.task_threads))
    rank, world = _world()
    share = _share(data.meta_batch, rank, world)
    samplers = build_samplers(data, cfg.seed)
    ways = None if samplers.task == "regression" else (data.train_ways or data.ways)

    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    learner = cls(example_shape=samplers.example_shape, ways=ways, config=config)
    if learner.task != samplers.task:
        raise OptionError("dataset", f"{name} is a {learner.task} learner but dataset {data.dataset!r} is {samplers.task}")
    learner.to(device)
    broadcast_module(learner)  # every rank starts from rank 0's initialisation (as DDP does)
    if world > 1:  # independent global RNG streams per rank (dropout, DropBlock); episodes do not use them
        torch.manual_seed(seed_from("rank", cfg.seed, rank))
        random.seed(seed_from("rank", "python", cfg.seed, rank))
        np.random.seed(seed_from("rank", "numpy", cfg.seed, rank) % 2**32)
    params = [p for p in learner.parameters() if p.requires_grad]
    if cfg.optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(params, lr=cfg.outer_lr, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.SGD(params, lr=cfg.outer_lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0,
                              weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, PiecewiseLR(cfg.lr_schedule))
    identity = _identity(name, learner, data, cfg, world)

    state = Progress()
    if resume:
        state = restore_run(folder.file(CHECKPOINT) if folder else None, identity, iterations=cfg.iterations,
                            learner=learner, optimizer=opt, scheduler=sched, sampler=samplers.train, rank=rank,
                            world=world, best=folder.file(BEST) if folder else None)
    if folder is not None:
        resolved = {k: v for c in (data, cfg, config) for k, v in opts.to_json(c).items()
                    if k in {f.name for f, _, _ in opts.cli_fields(type(c))}}
        folder.write_config(name, resolved, seed=cfg.seed)
    out = Path(cfg.out)
    with RunLog(out, rank == 0, cfg.tensorboard, state.iteration if resume else None) as log:
        _loop(learner, params, opt, sched, samplers, share, cfg, device, state, log, identity, out, rank, world)
    return _finish(name, learner, samplers, data, cfg, device, state, out, rank)


def _diverged(what: str, it: int, out: Path, checkpointed: int | None) -> TrainingDiverged:
    where = (f"The last checkpoint, {out / CHECKPOINT} (iteration {checkpointed}), is intact: resume from it with "
             "smaller learning rates" if checkpointed else "No checkpoint was written yet")
    return TrainingDiverged(f"{what} at meta-iteration {it}; lower the outer (--outer-lr) or inner (--inner-lr) "
                            f"learning rate, or clip the meta-gradient (--grad-clip). {where}.")


def _loop(learner: MetaLearner, params: list[Tensor], opt: torch.optim.Optimizer, sched: Any, samplers: Samplers,
          share: list[int], cfg: TrainConfig, device: torch.device, state: Progress, log: RunLog,
          identity: dict[str, Any], out: Path, rank: int, world: int) -> None:
    """The meta-training iterations from ``state.iteration`` to ``cfg.iterations`` (updates ``state``)."""
    bar = None
    if cfg.progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.iterations, initial=state.iteration, desc=f"train {type(learner).__name__}", dynamic_ncols=True)
    checkpointed = state.iteration or None
    warned: frozenset[tuple[Any, ...]] = frozenset()
    t_start, elapsed0 = time.perf_counter(), state.elapsed
    last_val: dict[str, Any] | None = None
    metric_name = "mse" if learner.task == "regression" else "acc"
    learner.train()
    threads = TaskThreads(learner, cfg.task_threads) if cfg.task_threads > 1 else None
    try:
        for it in range(state.iteration, cfg.iterations):
            samplers.train.iteration = it
            episodes = samplers.train.sample(it, indices=share).to(device)
            with collect_solve_info() as infos, warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                stats = meta_gradient(learner, episodes, params, threads)
            warned = replay_warnings(caught, warned, it + 1)
            if not math.isfinite(float(stats[0])):  # the mean over all ranks: every rank stops here
                what = ("an inner loss is not finite" if math.isinf(float(stats[0])) and math.isnan(float(stats[1]))
                        else f"the meta-loss is {float(stats[0])}")
                raise _diverged(what, it + 1, out, checkpointed)
            if cfg.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            sched.step()
            samplers.train.iteration = it + 1
            done = it + 1
            state.iteration = done
            state.elapsed = elapsed0 + time.perf_counter() - t_start
            state.record(float(stats[0]), float(stats[1]), worst_residuals(infos))  # implicit certificates too
            lr = opt.param_groups[0]["lr"]
            if done % cfg.log_every == 0 or done == cfg.iterations:
                row = state.take_period()
                log.log(done, "train", lr=lr, seconds=state.elapsed, **row)
                if bar is not None:
                    bar.set_postfix({"loss": f"{row['loss']:.4f}", metric_name: f"{row['metric']:.4f}",
                                     **({"val": f"{last_val['mean']:.4f}"} if last_val is not None else {})})
            if done % cfg.val_every == 0 or done == cfg.iterations:
                last_val = evaluate_learner(learner, samplers.val, cfg.val_episodes, device=device)
                log.log(done, "val", metric=last_val["mean"], ci95=last_val["ci95"], lr=lr, seconds=state.elapsed)
                if math.isfinite(last_val["mean"]) and _is_better(last_val["mean"], state.best["mean"], learner.task):
                    state.best = {**last_val, "iteration": done}
                    if rank == 0:
                        atomic_save(learner.state_dict(), out / BEST)
            if done % cfg.checkpoint_every == 0 or done == cfg.iterations:
                save_run(out / CHECKPOINT, identity, state, learner, opt, sched, samplers.train, rank, world)
                checkpointed = done
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        if threads is not None:
            threads.close()


def _finish(name: str, learner: MetaLearner, samplers: Samplers, data: DataConfig, cfg: TrainConfig,
            device: torch.device, state: Progress, out: Path, rank: int) -> dict[str, Any]:
    """Test the best validation state, then write ``model.pt``, ``metrics.json`` and ``curves.png``."""
    best_state = None
    if rank == 0 and (out / BEST).exists():
        best_state = read_torch_file(out / BEST, "best model (best.pt)")
    best_state = broadcast_object(best_state)
    if best_state is not None:
        learner.load_state_dict(best_state)
    test = evaluate_learner(learner, samplers.test, cfg.test_episodes, device=device, progress=cfg.progress, desc="test")
    _, world = _world()
    metrics = {"test": test, "val": dict(state.best), "iterations": cfg.iterations, "wall_seconds": state.elapsed,
               "world_size": world, "learner": name, "dataset": data.dataset}
    if rank == 0:
        save_learner(out / MODEL, learner, transform=samplers.transform,
                     metadata={"learner": name, "dataset": data.dataset, "ways": data.ways, "shots": data.shots,
                               "task": samplers.task, "data": opts.to_json(data), "seed": cfg.seed, "test": test})
        atomic_write_json(out / METRICS, metrics)
        from bilevel.plot import plot_run

        plot_run(out)
    return metrics



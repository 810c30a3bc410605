"""Training checkpoints: everything needed to resume a run exactly, in a file that runs no code.

A checkpoint (``format = "bilevel.checkpoint"``) is a dict of tensors and JSON-like values,
written atomically with :func:`torch.save` and read with ``torch.load(weights_only=True)``:

    {"format": "bilevel.checkpoint", "version": 1, "bilevel_version": ...,
     "identity":  {...},           # what makes it the same run (JSON-like; see bilevel.train)
     "iteration": int,             # outer steps done
     "learner":   {name: Tensor},  # learner.state_dict()
     "optimizer": {...}, "scheduler": {...},   # their state_dicts (tensors, numbers, lists)
     "sampler":   {...},           # the training sampler's position (JSON-like)
     "rng":       [per-rank RNG states as tensors and numbers],
     "best": {...}, "running": [loss_sum, metric_sum, count], "elapsed": seconds}

RNG states (torch, Python's ``random``, NumPy, CUDA) are converted to tensors and numbers by
:func:`rng_state` and back by :func:`set_rng_state`, so a resumed run draws the same numbers as
an uninterrupted one. :func:`save_run` / :func:`restore_run` save and restore a whole training
run (learner, optimizer, scheduler, sampler position, RNG states of every rank, :class:`Progress`).
"""
from __future__ import annotations

import json
import math
import os
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bilevel._atomic import atomic_save
from bilevel._version import __version__
from bilevel.distributed import broadcast_object, on_rank0, world_size_mismatch
from bilevel.io import ModelFileError, read_torch_file
from bilevel.options import OptionError

__all__ = ["CHECKPOINT_FORMAT", "CheckpointError", "Progress", "checkpoint_info", "load_checkpoint", "restore_run",
           "rng_state", "save_checkpoint", "save_run", "set_rng_state"]

CHECKPOINT_FORMAT = "bilevel.checkpoint"
CHECKPOINT_VERSION = 1
_KEYS = ("identity", "iteration", "learner", "optimizer", "scheduler", "sampler", "rng", "best", "running", "elapsed")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used to resume; the message names the file and what to do."""


def rng_state() -> dict[str, Any]:
    """This process's RNG states (torch, CUDA, Python ``random``, NumPy) as tensors and numbers."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": {"version": int(version), "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
        "numpy": {"name": str(name), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore the RNG states saved by :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state((npy["name"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["cached"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | os.PathLike, **content: Any) -> Path:
    """Write a checkpoint atomically (keyword arguments: the keys of the module docstring)."""
    missing = [k for k in _KEYS if k not in content]
    if missing:
        raise TypeError(f"save_checkpoint needs {missing}")
    payload = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "bilevel_version": __version__, **content}
    return atomic_save(payload, path)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check a checkpoint written by :func:`save_checkpoint` (no code runs while reading).

    Raises:
        FileNotFoundError: no file. CheckpointError: empty, truncated, not a checkpoint (e.g. a
            model file copied over it), another format version, or crafted content.
    """
    path = Path(path)
    try:
        payload = read_torch_file(path, "checkpoint")
    except ModelFileError as e:
        raise CheckpointError(f"{e}. Start a new run in another --out, or restore the file") from None
    if isinstance(payload, dict) and payload.get("format") == "bilevel.model":
        raise CheckpointError(f"{path} is a model file (model.pt), not a training checkpoint: it cannot be resumed. "
                              "Start a new run in another --out")
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a bilevel training checkpoint (written by bilevel before 0.2, or by "
                              "something else); start a new run in another --out")
    if payload.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"{path} has checkpoint version {payload.get('version')!r}; this bilevel ({__version__}) "
                              f"reads version {CHECKPOINT_VERSION}")
    missing = [k for k in _KEYS if k not in payload]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {missing}; it cannot be resumed")
    return payload


def checkpoint_info(out: str | os.PathLike) -> dict[str, int] | None:
    """``{"world_size", "iteration"}`` of ``out/checkpoint.pt`` (``None``: no checkpoint)."""
    path = Path(out) / "checkpoint.pt"
    if not path.exists():
        return None
    ckpt = load_checkpoint(path)
    return {"world_size": int(ckpt["identity"].get("world_size", 1)), "iteration": int(ckpt["iteration"])}


@dataclass
class Progress:
    """What the training loop carries from one iteration to the next (saved in checkpoints)."""

    iteration: int = 0
    best: dict[str, Any] = field(default_factory=lambda: {"mean": None, "iteration": None})
    #: since the last log row: loss sum, metric sum, count, worst implicit optimality and linear-solve residuals
    running: list[float] = field(default_factory=lambda: [0.0, 0.0, 0, math.nan, math.nan])
    elapsed: float = 0.0

    def record(self, loss: float, metric: float, residuals: Mapping[str, float]) -> None:
        """Add one iteration's meta-loss, metric and (implicit strategies') worst residuals to the period."""
        r = self.running
        worse = lambda a, b: b if math.isnan(a) or (not math.isnan(b) and b > a) else a  # noqa: E731
        self.running = [r[0] + loss, r[1] + metric, r[2] + 1, worse(r[3], residuals.get("optimality", math.nan)),
                        worse(r[4], residuals.get("linear_residual", math.nan))]

    def take_period(self) -> dict[str, float]:
        """The period's means and worst residuals (a log row); starts a new period."""
        r = self.running
        self.running = [0.0, 0.0, 0, math.nan, math.nan]
        return {"loss": r[0] / r[2], "metric": r[1] / r[2], "optimality": r[3], "linear_residual": r[4]}


def json_comparable(d: Mapping[str, Any]) -> Any:
    """``d`` as it reads back from JSON (tuples become lists), for comparing run identities."""
    return json.loads(json.dumps(d, default=str))


def save_run(path: Path, identity: Mapping[str, Any], progress: Progress, learner: torch.nn.Module, optimizer: Any,
             scheduler: Any, sampler: Any, rank: int, world: int) -> None:
    """Checkpoint a training run (collective: every rank calls it; rank 0 writes ``path``)."""
    rngs: Any = rng_state()
    if world > 1:
        import torch.distributed as dist

        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, rngs)
        rngs = gathered
    else:
        rngs = [rngs]
    if rank == 0:
        save_checkpoint(path, identity=json_comparable(identity), iteration=progress.iteration,
                        learner=learner.state_dict(), optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                        sampler=sampler.state_dict(), rng=rngs, best=progress.best, running=progress.running,
                        elapsed=progress.elapsed)


def restore_run(path: Path | None, identity: Mapping[str, Any], *, iterations: int, learner: torch.nn.Module,
                optimizer: Any, scheduler: Any, sampler: Any, rank: int, world: int,
                best: Path | None = None) -> Progress:
    """Restore a run from its checkpoint (collective; rank 0 reads ``path``, every rank gets it).

    Checks, before anything is restored: the checkpoint's run identity equals ``identity``, it
    was written by ``world`` processes, and ``iterations`` is not below its iteration; ``best``
    (the run's ``best.pt``, if any) is readable.

    Raises:
        CheckpointError: unreadable checkpoint or best model. OptionError: another run, another
            number of processes, or ``iterations`` below the checkpoint's.
    """
    def read() -> dict[str, Any]:
        assert path is not None
        checkpoint = load_checkpoint(path)
        if best is not None and best.exists():
            try:
                read_torch_file(best, "best model")
            except ModelFileError as e:
                raise CheckpointError(f"{e}. Delete it to resume without the best model so far (the run then keeps "
                                      "the best of what follows), or restore it") from None
        return checkpoint

    ckpt = broadcast_object(on_rank0(read))
    out = path.parent if path is not None else "the run folder"
    written_by = ckpt["identity"].get("world_size", 1)
    if written_by != world:
        raise OptionError("resume", world_size_mismatch(out, written_by, world))
    mine, theirs = json_comparable(identity), ckpt["identity"]
    mismatch = sorted(k for k in set(mine) | set(theirs) if theirs.get(k) != mine.get(k))
    if mismatch:
        detail = "; ".join(f"{k}: checkpoint {theirs.get(k)!r} vs now {mine.get(k)!r}" for k in mismatch)
        raise OptionError("resume", f"--resume: the checkpoint in {out} was written by a different run ({detail})")
    if iterations < ckpt["iteration"]:
        raise OptionError("iterations", f"--resume with --iterations {iterations}: the checkpoint in {out} is already "
                          f"at iteration {ckpt['iteration']}; pass --iterations >= {ckpt['iteration']}")
    learner.load_state_dict(ckpt["learner"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    sampler.load_state_dict(ckpt["sampler"])
    set_rng_state(ckpt["rng"][rank])
    return Progress(int(ckpt["iteration"]), dict(ckpt["best"]), list(ckpt["running"]), float(ckpt["elapsed"]))

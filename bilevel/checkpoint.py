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
an uninterrupted one.
"""
from __future__ import annotations

import os
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bilevel._atomic import atomic_save
from bilevel._version import __version__
from bilevel.io import ModelFileError, read_torch_file

__all__ = ["CHECKPOINT_FORMAT", "CheckpointError", "checkpoint_info", "load_checkpoint", "rng_state",
           "save_checkpoint", "set_rng_state"]

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

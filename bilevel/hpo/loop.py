"""The hyper-optimisation loop: λ ← λ − step(∇f(λ)) with a progress bar, a CSV log and metrics.json.

Gradient-based HPO (Franceschi et al. 2018, §2) repeats three things: compute the hypergradient
∇f(λ) of the validation loss f(λ) = E(w_T(λ), λ) with a strategy of :mod:`bilevel.hypergrad`,
take an optimizer step on λ (optionally projecting λ back onto its feasible set Λ), and record
what happened. :func:`hyper_loop` owns the recording (tqdm, one CSV row per hyper-step written
and flushed as it comes); the caller's ``step`` function owns the mathematics.
"""
from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from bilevel._atomic import atomic_write_text
from bilevel.hpo.data import TaskData
from bilevel.hpo.models import evaluate
from bilevel.hypergrad import Strategy
from bilevel.options import OptionError
from bilevel.problem import BilevelProblem
from bilevel.solve import solve

def apply_hypergradient(optimizer: torch.optim.Optimizer, hparams: Mapping[str, Tensor], grads: Mapping[str, Tensor]) -> None:
    """One optimizer step on λ with the given hypergradient (the explicit ``.grad`` opt-in).

    Invariant: after the call, λ has moved by the optimizer's rule applied to ``grads`` only
    (any stale ``.grad`` is overwritten first).

    Args:
        optimizer: a ``torch.optim`` optimizer over the tensors of ``hparams``.
        hparams: λ, the dict of leaf tensors the optimizer owns.
        grads: df/dλ for every key of ``hparams`` that requires grad (e.g. ``Hypergradient.hparams``).

    Raises:
        ValueError: a missing key, a shape mismatch, or a non-finite hypergradient.
    """
    for k, v in hparams.items():
        if not v.requires_grad:
            continue
        if k not in grads:
            raise ValueError(f"no hypergradient for hparams[{k!r}]; got keys {list(grads)}")
        g = grads[k]
        if g.shape != v.shape:
            raise ValueError(f"hypergradient for hparams[{k!r}] has shape {list(g.shape)}, expected {list(v.shape)}")
        if not bool(torch.isfinite(g).all()):
            raise ValueError(f"hypergradient for hparams[{k!r}] is not finite; lower the hyper learning rate or the inner learning rate")
        v.grad = g.detach().clone()
    optimizer.step()


def hyper_step(
    problem: BilevelProblem,
    hparams: dict[str, Tensor],
    optimizer: torch.optim.Optimizer,
    *,
    params0: dict[str, Tensor],
    batch: Any,
    val_batch: Any,
    dynamics: Any,
    steps: int,
    hypergrad: Strategy,
    warm_start: bool = False,
    project: Callable[[dict[str, Tensor]], None] | None = None,
    record: Callable[[dict[str, Tensor]], Mapping[str, float]] | None = None,
) -> Callable[[int], dict[str, float]]:
    """The body of one hyper-iteration on a fixed data set, to pass to :func:`hyper_loop`.

    Each call runs w_T = ``solve``(w_0, λ) for ``steps`` steps, evaluates the outer loss
    f(λ) = E(w_T, λ, ``val_batch``), back-propagates it to λ with the strategy ``hypergrad``,
    steps ``optimizer`` and applies ``project`` (e.g. clamping onto Λ) — projected hypergradient
    descent (Franceschi et al. 2017, §5.1).

    Args:
        problem: the bilevel problem.
        hparams: λ, leaf tensors owned by ``optimizer``; those requiring grad are tuned.
        optimizer: the outer optimizer (e.g. ``torch.optim.Adam(hparams.values())``).
        params0: w_0.
        batch: the inner data (as for :func:`bilevel.solve`).
        val_batch: the outer data.
        dynamics, steps, hypergrad: as for :func:`bilevel.solve`.
        warm_start: start each inner run from the previous w_T (detached) instead of ``params0``;
            sound for ``Implicit``, whose hypergradient depends on the end point only.
        project: in-place map of λ onto its feasible set, called under ``no_grad`` after each step.
        record: extra numbers to log, computed from λ *before* the update (matching ``val_loss``).

    Returns:
        ``step(it) -> {"val_loss": f(λ), **record(λ)}``.
    """
    keys = [k for k, v in hparams.items() if v.requires_grad]
    if not keys:
        raise ValueError(f"hyper_step: no hparams require grad (keys {list(hparams)}); nothing to tune")
    start = {"params": params0}

    def step(it: int) -> dict[str, float]:
        row = {k: float(v) for k, v in (record(hparams) if record is not None else {}).items()}
        w_t = solve(problem, start["params"], hparams, batch, dynamics=dynamics, steps=steps, hypergrad=hypergrad)
        value = problem.outer_loss(w_t, hparams, val_batch)
        grads = torch.autograd.grad(value, [hparams[k] for k in keys])
        apply_hypergradient(optimizer, hparams, dict(zip(keys, grads)))
        if project is not None:
            with torch.no_grad():
                project(hparams)
        if warm_start:
            start["params"] = {k: v.detach() for k, v in w_t.items()}
        return {"val_loss": float(value.detach()), **row}

    return step


def refit_and_evaluate(
    problem: BilevelProblem,
    model: torch.nn.Module,
    hparams: dict[str, Tensor],
    batch: Any,
    data: TaskData,
    *,
    params0: dict[str, Tensor],
    dynamics: Any,
    steps: int,
) -> dict[str, float]:
    """Train w_T from ``params0`` with λ = ``hparams`` held fixed (no graph); score it on val and test.

    The one procedure by which the HPO tasks compare hyperparameters (grid points, tuned values,
    baseline and oracle weights), so that differences come from λ alone.

    Returns:
        ``{"val_loss", "val_accuracy", "test_loss", "test_accuracy"}`` as floats.
    """
    with torch.no_grad():
        w = solve(problem, params0, hparams, batch, dynamics=dynamics, steps=steps)
    (val_loss, val_acc), (test_loss, test_acc) = evaluate(model, w, data.val), evaluate(model, w, data.test)
    return {"val_loss": val_loss, "val_accuracy": val_acc, "test_loss": test_loss, "test_accuracy": test_acc}


def _fmt(v: Any) -> Any:
    return f"{v:.6g}" if isinstance(v, float) else v


def hyper_loop(
    step: Callable[[int], Mapping[str, float]],
    hyper_steps: int,
    *,
    out: str | Path | None = None,
    log_name: str = "log.csv",
    desc: str = "hpo",
    progress: bool = True,
    show: tuple[str, ...] = ("val_loss",),
) -> list[dict[str, float]]:
    """Run ``step(1), …, step(hyper_steps)``, logging each returned row.

    Each call of ``step(it)`` performs one hyper-iteration (hypergradient + update of λ) and
    returns the numbers worth logging (e.g. ``{"val_loss": f(λ), "lr": η}``). The loop adds
    ``"step": it``, shows ``show`` keys on a tqdm progress bar, and appends the row to
    ``out/log_name`` (CSV, header from the first row, flushed after every row so that a killed
    run keeps what it logged).

    Args:
        step: the body of one hyper-iteration, ``it -> {name: float}`` (same keys every time).
        hyper_steps: number of hyper-iterations (≥ 1).
        out: folder for the CSV (created if needed); ``None`` logs nothing to disk.
        log_name: file name of the CSV inside ``out``.
        desc: progress-bar label.
        progress: show the progress bar.
        show: keys displayed on the progress bar.

    Returns:
        The rows, one dict per hyper-step.

    Raises:
        ValueError: ``val_loss`` (or any logged number) is not finite, naming the hyper-step.
    """
    from tqdm.auto import tqdm  # lazy: keeps ``import bilevel.hpo`` light

    if isinstance(hyper_steps, bool) or not isinstance(hyper_steps, int) or hyper_steps < 1:
        raise OptionError("hyper_steps", f"hyper_steps must be an integer >= 1, got {hyper_steps!r}")
    history: list[dict[str, float]] = []
    handle = writer = None
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        handle = open(Path(out) / log_name, "w", newline="")  # noqa: SIM115 (closed in finally)
    try:
        bar = tqdm(range(1, hyper_steps + 1), desc=desc, disable=not progress, leave=False)
        for it in bar:
            row = {"step": it, **{k: (float(v) if isinstance(v, (int, float, Tensor)) else v) for k, v in step(it).items()}}
            bad = [k for k, v in row.items() if isinstance(v, float) and not math.isfinite(v)]
            if bad:
                raise ValueError(f"hyper-step {it}: {bad} not finite ({ {k: row[k] for k in bad} }); lower the hyper learning rate")
            history.append(row)
            if handle is not None:
                if writer is None:
                    writer = csv.DictWriter(handle, fieldnames=list(row))
                    writer.writeheader()
                writer.writerow({k: _fmt(v) for k, v in row.items()})
                handle.flush()
            bar.set_postfix({k: f"{row[k]:.4g}" for k in show if k in row})
    finally:
        if handle is not None:
            handle.close()
    return history


def write_json(path: str | Path, data: Mapping[str, Any]) -> Path:
    """Write ``data`` as indented JSON atomically (:func:`bilevel._atomic.atomic_write_text`); returns the path.

    Tensors are written as (nested) lists and paths as text.
    """
    return atomic_write_text(path, json.dumps(data, indent=2, default=_jsonable) + "\n")


def _jsonable(v: Any) -> Any:
    if isinstance(v, Tensor):
        return v.detach().cpu().tolist()
    if isinstance(v, Path):
        return str(v)
    raise TypeError(f"cannot write {type(v).__name__} to JSON")


__all__ = ["apply_hypergradient", "hyper_loop", "hyper_step", "refit_and_evaluate", "write_json"]

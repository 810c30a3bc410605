"""The hyper-optimisation loop: λ ← λ − step(∇f(λ)) with a progress bar, a CSV log and metrics.json.

Gradient-based HPO (Franceschi et al. 2018, §2) repeats three things: compute the hypergradient
∇f(λ) of the validation loss f(λ) = E(w_T(λ), λ) with a strategy of :mod:`bilevel.hypergrad`,
take an optimizer step on λ (optionally projecting λ back onto its feasible set Λ), and record
what happened. :func:`hyper_loop` owns the recording (tqdm, one CSV row per hyper-step written
and flushed as it comes); the caller's ``step`` function owns the mathematics. State is explicit:
``step(it, state) -> (row, state)``, with :class:`HyperState` (λ, its optimizer, where the next
inner run starts) for the steps of this package, e.g. :class:`HyperStep`.
"""
from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import KW_ONLY, dataclass
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import torch
from torch import Tensor

from bilevel._atomic import atomic_write_text
from bilevel._tree import Params
from bilevel.hpo.data import TaskData
from bilevel.hpo.models import evaluate
from bilevel.hypergrad import Strategy
from bilevel.options import OptionError
from bilevel.problem import BilevelProblem
from bilevel.solve import InnerState, solve

S = TypeVar("S")

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


class HyperState(NamedTuple):
    """What one hyper-step hands to the next: the explicit state of a hyper-loop.

    A step function receives the state and returns the next one (``step(it, state) -> (row,
    state)``); nothing that changes between hyper-steps lives in a closure.

    Attributes:
        hparams: λ, the dict of leaf tensors that ``optimizer`` owns. They are updated in place by
            ``optimizer.step()`` (torch.optim's rule, through :func:`apply_hypergradient`), so the
            same dict travels from state to state.
        optimizer: the outer optimizer (e.g. ``torch.optim.Adam(hparams.values())``) and its moments.
        inner: where the next inner run starts: w_0 (a dict of tensors), or the detached
            :class:`bilevel.InnerState` where an earlier run stopped (warm start, online HO); it
            also carries Implicit's optimality scale of the chain's cold start.
            ``None`` when every hyper-step draws its own w_0 (the ``lr`` task offline).
    """

    hparams: dict[str, Tensor]
    optimizer: torch.optim.Optimizer
    inner: Params | InnerState | None = None


@dataclass(frozen=True)
class HyperStep:
    """One hyper-iteration of (projected) hypergradient descent on a fixed data set: the step of :func:`hyper_loop`.

    Built as ``HyperStep(problem, batch, val_batch, dynamics=…, steps=…, hypergrad=…)``;
    ``step(it, state)`` runs w_T = ``solve``(w_0, λ) for ``steps`` steps, evaluates the outer loss
    f(λ) = E(w_T, λ, ``val_batch``), back-propagates it to λ with the strategy ``hypergrad``,
    steps the optimizer and applies ``project`` (e.g. clamping onto Λ) — projected hypergradient
    descent (Franceschi et al. 2017, §5.1). The object holds only constants; λ, the optimizer and
    the inner starting point travel in the :class:`HyperState`.

    Invariant (``warm_start``): hyper-step k + 1 starts the inner dynamics at w_T of hyper-step k
    (detached; ``dynamics.init`` re-initialises its auxiliary state, e.g. the heavy-ball velocity),
    and Implicit's optimality residual is measured against ‖F(w_0, λ_0)‖ of the first, cold, run.

    Attributes:
        problem: the bilevel problem.
        batch: the inner data (as for :func:`bilevel.solve`).
        val_batch: the outer data.
        dynamics, steps, hypergrad: as for :func:`bilevel.solve`.
        warm_start: start each inner run from the previous w_T instead of w_0; sound for
            ``Implicit``, whose hypergradient depends on the end point only.
        project: in-place map of λ onto its feasible set, called under ``no_grad`` after each step.
        record: extra numbers to log, computed from λ *before* the update (matching ``val_loss``).
    """

    problem: BilevelProblem
    batch: Any
    val_batch: Any
    _: KW_ONLY
    dynamics: Any
    steps: int
    hypergrad: Strategy
    warm_start: bool = False
    project: Callable[[dict[str, Tensor]], None] | None = None
    record: Callable[[dict[str, Tensor]], Mapping[str, float]] | None = None

    def init(self, hparams: dict[str, Tensor], optimizer: torch.optim.Optimizer, params0: Params) -> HyperState:
        """The state before the first hyper-step: λ, its optimizer, and the inner run starting at w_0 = ``params0``.

        Raises:
            ValueError: no entry of ``hparams`` requires grad (nothing to tune).
        """
        if not any(v.requires_grad for v in hparams.values()):
            raise ValueError(f"HyperStep: no hparams require grad (keys {list(hparams)}); nothing to tune")
        return HyperState(hparams, optimizer, dict(params0))

    def __call__(self, it: int, state: HyperState) -> tuple[dict[str, float], HyperState]:
        """Hyper-step ``it``: returns ``({"val_loss": f(λ), **record(λ)}, next state)``."""
        hparams = state.hparams
        keys = [k for k, v in hparams.items() if v.requires_grad]
        row = {k: float(v) for k, v in (self.record(hparams) if self.record is not None else {}).items()}
        w_t, inner = solve(self.problem, state.inner, hparams, self.batch, dynamics=self.dynamics, steps=self.steps,
                           hypergrad=self.hypergrad, return_state=True)
        value = self.problem.outer_loss(w_t, hparams, self.val_batch)
        grads = torch.autograd.grad(value, [hparams[k] for k in keys])
        apply_hypergradient(state.optimizer, hparams, dict(zip(keys, grads)))
        if self.project is not None:
            with torch.no_grad():
                self.project(hparams)
        nxt = state.inner
        if self.warm_start:
            w_end = {k: v.detach() for k, v in w_t.items()}
            if inner.optimality_scale is None:
                nxt = w_end
            else:  # restart the dynamics at w_T, keeping the cold start's certificate scale
                h = {k: v.detach() for k, v in hparams.items()}
                nxt = InnerState(self.dynamics.init(w_end, h), 0, optimality_scale=inner.optimality_scale)
        return {"val_loss": float(value.detach()), **row}, state._replace(inner=nxt)


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
    step: Callable[[int, S], tuple[Mapping[str, Any], S]],
    state: S,
    hyper_steps: int,
    *,
    out: str | Path | None = None,
    log_name: str = "log.csv",
    desc: str = "hpo",
    progress: bool = True,
    show: tuple[str, ...] = ("val_loss",),
) -> tuple[list[dict[str, Any]], S]:
    """Run ``row, state = step(it, state)`` for it = 1, …, hyper_steps, logging each row.

    Each call performs one hyper-iteration (hypergradient + update of λ) on the state it is
    given and returns the numbers worth logging (e.g. ``{"val_loss": f(λ), "lr": η}``) with the
    next state (explicit state: init/step style; e.g. :class:`HyperStep` with its
    :meth:`HyperStep.init`, or any function and state of your own). The loop adds
    ``"step": it``, shows ``show`` keys on a tqdm progress bar, and appends the row to
    ``out/log_name`` (CSV, header from the first row, flushed after every row so that a killed
    run keeps what it logged).

    Args:
        step: the body of one hyper-iteration, ``(it, state) -> ({name: float}, next state)``
            (same keys every time).
        state: the state before the first hyper-step.
        hyper_steps: number of hyper-iterations (≥ 1).
        out: folder for the CSV (created if needed); ``None`` logs nothing to disk.
        log_name: file name of the CSV inside ``out``.
        desc: progress-bar label.
        progress: show the progress bar.
        show: keys displayed on the progress bar.

    Returns:
        ``(rows, state)``: one dict per hyper-step, and the state after the last one.

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
            got, state = step(it, state)
            row = {"step": it, **{k: (float(v) if isinstance(v, (int, float, Tensor)) else v) for k, v in got.items()}}
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
    return history, state


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


__all__ = ["HyperState", "HyperStep", "apply_hypergradient", "hyper_loop", "refit_and_evaluate", "write_json"]

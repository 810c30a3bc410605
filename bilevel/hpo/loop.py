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
import warnings
from collections.abc import Callable, Mapping
from dataclasses import KW_ONLY, dataclass
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import torch
from torch import Tensor

from bilevel._atomic import atomic_write_text
from bilevel._tree import Params, detach
from bilevel.hpo.data import TaskData
from bilevel.hpo.models import evaluate
from bilevel.hypergrad import Implicit, InexactHypergradientWarning, Strategy
from bilevel.options import OptionError
from bilevel.problem import BilevelProblem
from bilevel.solve import InnerState, SolveInfo, solve

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
        linsolve: ``Implicit(..., warm_start=True)`` only — the previous linear-solve solution u
            (detached, shaped like params), the initial guess of the next one.
    """

    hparams: dict[str, Tensor]
    optimizer: torch.optim.Optimizer
    inner: Params | InnerState | None = None
    linsolve: Params | None = None


@dataclass(frozen=True)
class HyperStep:
    """One hyper-iteration of (projected) hypergradient descent on a fixed data set: the step of :func:`hyper_loop`.

    Built as ``HyperStep(problem, batch, val_batch, dynamics=…, steps=…, hypergrad=…)``;
    ``step(it, state)`` runs w_T = ``solve``(w_0, λ) for ``steps`` steps, evaluates the outer loss
    f(λ) = E(w_T, λ, ``val_batch``), back-propagates it to λ with the strategy ``hypergrad``,
    steps the optimizer and applies ``project`` (e.g. clamping onto Λ) — projected hypergradient
    descent (Franceschi et al. 2017, §5.1). The object holds only constants; λ, the optimizer, the
    inner starting point and the previous linear-solve solution travel in the :class:`HyperState`.

    Invariants:

    * ``warm_start``: hyper-step k + 1 starts the inner dynamics at w_T of hyper-step k
      (detached; ``dynamics.init`` re-initialises its auxiliary state, e.g. the heavy-ball
      velocity), and Implicit's optimality residual r_opt = ‖F(w_T, λ_k)‖ / ‖F(w_0, λ_0)‖ is
      measured against the first, cold, run: the scale HOAG's inner tolerance uses.
    * ``max_steps`` (``Implicit`` only): the inner run goes on, ``steps`` at a time from where it
      stopped, until its optimality certificate holds (r_opt ≤ ``hypergrad.tol`` or
      ‖F(w_T, λ)‖ ≤ ``hypergrad.atol``) or ``max_steps`` steps are spent — the inner problem
      solved to a tolerance, as in HOAG (Pedregosa 2016, Alg. 1). Only a hyper-step that hits
      ``max_steps`` (or whose linear solve misses ``tol``) gets Implicit's warning, prefixed
      with the hyper-step and the inner steps it ran in all.
    * ``hypergrad.warm_start`` (``Implicit``): each linear solve starts from the previous one's
      solution u (also HOAG's rule), carried in :attr:`HyperState.linsolve`.

    With ``Implicit``, each row also has ``inner_steps`` (steps run this hyper-step) and the
    certificate (:meth:`bilevel.SolveInfo.as_dict`): ``optimality`` (r_opt),
    ``linear_residual`` (‖A u − b‖/‖b‖) and ``linear_iterations``.

    Attributes:
        problem: the bilevel problem.
        batch: the inner data (as for :func:`bilevel.solve`).
        val_batch: the outer data.
        dynamics, steps, hypergrad: as for :func:`bilevel.solve` (``steps``: per run, or per chunk
            with ``max_steps``).
        warm_start: start each inner run from the previous w_T instead of w_0; sound for
            ``Implicit``, whose hypergradient depends on the end point only.
        max_steps: ``Implicit`` only — run the inner dynamics until its optimality certificate
            holds, at most this many steps per hyper-step; ``None``: exactly ``steps``.
        project: in-place map of λ onto its feasible set, called under ``no_grad`` after each step.
        record: extra numbers to log, computed from λ *before* the update (matching ``val_loss``).

    Reference: Pedregosa (2016), *Hyperparameter optimization with approximate gradient*, Alg. 1
    (inner problem and linear system solved to a tolerance, both warm-started).
    """

    problem: BilevelProblem
    batch: Any
    val_batch: Any
    _: KW_ONLY
    dynamics: Any
    steps: int
    hypergrad: Strategy
    warm_start: bool = False
    max_steps: int | None = None
    project: Callable[[dict[str, Tensor]], None] | None = None
    record: Callable[[dict[str, Tensor]], Mapping[str, float]] | None = None

    def __post_init__(self) -> None:
        if self.max_steps is not None:
            if not isinstance(self.hypergrad, Implicit):
                raise ValueError(f"HyperStep(max_steps=...) continues the inner run until Implicit's optimality "
                                 f"certificate holds; hypergrad={self.hypergrad!r} has none (leave max_steps=None)")
            if isinstance(self.max_steps, bool) or not isinstance(self.max_steps, int) or self.max_steps < self.steps:
                raise ValueError(f"HyperStep(max_steps=...) must be an integer >= steps={self.steps}, got {self.max_steps!r}")

    def init(self, hparams: dict[str, Tensor], optimizer: torch.optim.Optimizer, params0: Params) -> HyperState:
        """The state before the first hyper-step: λ, its optimizer, and the inner run starting at w_0 = ``params0``.

        Raises:
            ValueError: no entry of ``hparams`` requires grad (nothing to tune).
        """
        if not any(v.requires_grad for v in hparams.values()):
            raise ValueError(f"HyperStep: no hparams require grad (keys {list(hparams)}); nothing to tune")
        return HyperState(hparams, optimizer, dict(params0))

    def __call__(self, it: int, state: HyperState) -> tuple[dict[str, float], HyperState]:
        """Hyper-step ``it``: returns ``({"val_loss": f(λ), **record(λ), [certificate]}, next state)``."""
        hparams, strategy = state.hparams, self.hypergrad
        keys = [k for k, v in hparams.items() if v.requires_grad]
        row = {k: float(v) for k, v in (self.record(hparams) if self.record is not None else {}).items()}
        implicit = isinstance(strategy, Implicit)
        warm_u = implicit and strategy.warm_start  # type: ignore[union-attr]
        start, used, steps = state.inner, 0, self.steps
        while True:
            w_t, inner, info = solve(self.problem, start, hparams, self.batch, dynamics=self.dynamics, steps=steps,
                                     hypergrad=strategy, return_state=True, return_info=True,
                                     linsolve_init=state.linsolve if warm_u else None)
            used += steps
            if self.max_steps is None or used >= self.max_steps or _certified(strategy, info):
                break
            steps = min(self.steps, self.max_steps - used)
            start = InnerState(detach(inner.dynamics_state), inner.t, None, (), inner.optimality_scale)
        value = self.problem.outer_loss(w_t, hparams, self.val_batch)
        with warnings.catch_warnings(record=True) as caught:  # Implicit certifies (and may warn) in the backward pass
            warnings.simplefilter("always")
            grads = torch.autograd.grad(value, [hparams[k] for k in keys])
        self._rewarn(caught, it, used)
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
        out = {"val_loss": float(value.detach()), **row}
        if implicit:
            out.update(inner_steps=float(used), **info.as_dict())
        return out, state._replace(inner=nxt, linsolve=info.linear_solution if warm_u else None)

    def _rewarn(self, caught: list[warnings.WarningMessage], it: int, used: int) -> None:
        """Re-emit the backward pass's warnings (the caller's filters apply); Implicit's get the hyper-step's context.

        Implicit's message speaks of its last ``solve`` call ("after ``steps`` inner steps"); with
        ``max_steps`` that call continued a longer run, so the message is prefixed with the whole.
        """
        for w in caught:
            message: Warning | str = w.message
            if issubclass(w.category, InexactHypergradientWarning):
                whole = (f"{used} inner steps in all, up to max_steps={self.max_steps} ({self.steps} at a time until "
                         "the optimality residual is within tol)" if self.max_steps is not None else f"{used} inner steps")
                message = f"hyper-step {it}, {whole}: {w.message}"
            warnings.warn_explicit(message, w.category, w.filename, w.lineno, source=w.source)


def _certified(strategy: Implicit, info: SolveInfo) -> bool:
    """Implicit's optimality certificate holds at w_T: r_opt ≤ tol, or ‖F(w_T, λ)‖ ≤ atol."""
    return bool(info.optimality <= strategy.tol or info.optimality_norm <= strategy.atol)


#: the certificate's columns of a hyper-step row (``SolveInfo.as_dict``) summarised in metrics.json.
_RESIDUALS = ("optimality", "linear_residual")


def residual_summary(history: list[dict[str, Any]]) -> dict[str, float]:
    """``{NAME_max, NAME_last}`` over the hyper-steps for each certificate column the rows have (else ``{}``).

    Args:
        history: the rows of :func:`hyper_loop` (an ``Implicit`` :class:`HyperStep` logs ``optimality`` and
            ``linear_residual``).

    Returns:
        e.g. ``{"optimality_max": …, "optimality_last": …, "linear_residual_max": …, "linear_residual_last": …}``.
    """
    out: dict[str, float] = {}
    for name in _RESIDUALS:
        values = [row[name] for row in history if name in row]
        if values:
            out[f"{name}_max"], out[f"{name}_last"] = max(values), values[-1]
    return out


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


__all__ = ["HyperState", "HyperStep", "apply_hypergradient", "hyper_loop", "refit_and_evaluate", "residual_summary",
           "write_json"]

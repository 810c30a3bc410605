"""The unrolling engine shared by every hypergradient strategy (internal).

``Run`` bundles one call of :func:`bilevel.solve`; ``unroll`` advances the dynamics for a range
of steps in one of three modes:

* ``"graph"``: inner gradients with ``create_graph=True`` — w_t is differentiable w.r.t. λ and
  w_0 through the whole step (reverse mode);
* ``"first_order"``: inner gradients are constants (no second-order terms); the dynamics step
  itself stays differentiable, so coefficients such as learning rates still get gradients;
* ``"nograd"``: nothing is recorded; hparams are detached (the forward pass of NoInner,
  Truncated's prefix and Implicit's inner solve).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor

from bilevel import _tree as T
from bilevel._tree import Params
from bilevel.problem import BilevelProblem


class NonFiniteError(ValueError):
    """The inner loss became NaN or infinite (the inner dynamics diverged); the message names the step."""


class InnerState(NamedTuple):
    """Where an inner run stopped; pass it back to :func:`bilevel.solve` as ``params0`` to go on.

    Attributes:
        dynamics_state: the dynamics state s_t (a pytree of tensors; ``dynamics.params`` gives w_t).
        t: number of inner steps taken so far (the next step is t + 1).
        tangents: Forward() only — ds_t/dλ for the hparams listed in ``tangent_keys``, as a pytree
            shaped like s_t whose leaves have a leading dimension m = number of hparam entries.
        tangent_keys: the hparams keys (in order) that ``tangents`` differentiates.
        optimality_scale: Implicit() only — ‖F(w_0, λ)‖ at the start of the first run of this chain
            of runs (the scale of Implicit's optimality certificate; carried so that a run continued
            from a converged state is still measured against its cold start).
    """

    dynamics_state: Any
    t: int
    tangents: Any = None
    tangent_keys: tuple[str, ...] = ()
    optimality_scale: float | None = None


@dataclass
class SolveInfo:
    """What :func:`bilevel.solve` measured about its w_T (``solve(..., return_info=True)``).

    Only :class:`bilevel.Implicit` measures anything today; other strategies leave the fields
    ``None``. The optimality fields are set when ``solve`` returns. The linear-solve fields are
    filled in by the backward pass through w_T (``loss.backward()`` or ``torch.autograd.grad``):
    read them after it; they stay ``None`` if no backward pass reached w_T, and a second backward
    pass (``retain_graph=True``) overwrites them.

    Attributes:
        strategy: the strategy that produced w_T.
        steps: T, the inner steps of this call.
        optimality: the relative optimality residual ‖F(w_T, λ)‖ / ``optimality_scale``.
        optimality_norm: ‖F(w_T, λ)‖ (Euclidean norm over all entries of params).
        optimality_scale: the scale ‖F(w_0, λ)‖ at the start of the run (or carried by the
            :class:`InnerState` the run continued from).
        linear: the :class:`bilevel.linsolve.LinearSolveInfo` of the last backward pass
            (``linear.residual`` = ‖A u − b‖/‖b‖).
        linear_solution: u, the solution of that linear solve (detached; shaped like params), the
            warm start of the next outer step's solve (``solve(..., linsolve_init=u)``).
    """

    strategy: Any
    steps: int
    optimality: float | None = None
    optimality_norm: float | None = None
    optimality_scale: float | None = None
    linear: Any = None
    linear_solution: Params | None = None

    def as_dict(self) -> dict[str, float]:
        """The measured numbers as flat floats for logging (fields not measured are left out)."""
        out: dict[str, float] = {}
        if self.optimality is not None:
            out["optimality"] = self.optimality
        if self.linear is not None:
            out["linear_residual"] = self.linear.residual
            out["linear_iterations"] = float(self.linear.iterations)
        return out


@dataclass
class Run:
    """One call of :func:`bilevel.solve`, as seen by a strategy."""

    problem: BilevelProblem
    dynamics: Any
    hparams: Params
    batch: Any
    steps: int
    check_finite: bool
    params_ref: Params  # w_0 (or w_t when continuing): keys and shapes every step must keep
    params0: Params | None  # None when continuing from an InnerState
    state0: Any  # s_0 (or the incoming s_t)
    t0: int = 0
    tangents0: Any = None
    tangent_keys0: tuple[str, ...] = ()
    optimality_scale0: float | None = None  # carried by the incoming InnerState
    linsolve_x0: Params | None = None  # Implicit(): initial guess of the linear solve
    info: SolveInfo | None = None  # filled by the strategy (Implicit) and its backward pass
    _batch_is_fn: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        self._batch_is_fn = callable(self.batch) and not isinstance(self.batch, (Tensor, dict, list, tuple))

    @property
    def batch_is_fn(self) -> bool:
        return self._batch_is_fn

    def batch_at(self, t: int) -> Any:
        return self.batch(t) if self._batch_is_fn else self.batch

    @property
    def t_end(self) -> int:
        return self.t0 + self.steps

    def hparams_detached(self) -> Params:
        return {k: v.detach() for k, v in self.hparams.items()}


def check_loss(loss: Any, t: int, steps_end: int, check_finite: bool, what: str = "inner_loss") -> Tensor:
    """Validate an inner-loss value: a finite scalar tensor."""
    if not isinstance(loss, Tensor):
        raise TypeError(f"{what} must return a scalar tensor, got {type(loss).__name__} at step {t}")
    if loss.numel() != 1:
        raise ValueError(f"{what} must return a scalar tensor, got shape {list(loss.shape)} at step {t}")
    if check_finite and not bool(torch.isfinite(loss.detach()).all()):
        raise NonFiniteError(
            f"{what} is not finite ({float(loss.detach()):g}) at step {t} of {steps_end}; "
            "lower the inner learning rate or check the data (pass check_finite=False to skip this check)"
        )
    return loss.reshape(())


def check_state_params(run: Run, state: Any, t: int) -> Params:
    params = run.dynamics.params(state)
    T.check_like(run.params_ref, params, "params returned by the dynamics", f"at step {t}")
    return params


def inner_grads(
    run: Run, params: Params, hparams: Params, t: int, *, create_graph: bool
) -> tuple[Params, Tensor]:
    """g_t = ∇_w L(w, λ, B_t) and L_t, with or without a differentiable graph."""
    batch = run.batch_at(t)
    with torch.enable_grad():
        if create_graph:
            w_in = {k: (v if v.requires_grad else v.detach().requires_grad_(True)) for k, v in params.items()}
        else:
            w_in = T.detach_requires_grad(params)
        loss = check_loss(run.problem.inner_loss(w_in, hparams, batch), t, run.t_end, run.check_finite)
        if not loss.requires_grad:
            grads = [None] * len(w_in)
        else:
            grads = torch.autograd.grad(loss, list(w_in.values()), create_graph=create_graph, allow_unused=True)
    out = {k: (g if g is not None else torch.zeros_like(w_in[k])) for (k, w), g in zip(w_in.items(), grads)}
    if not create_graph:
        loss = loss.detach()
    return out, loss


def unroll(run: Run, state: Any, t_start: int, t_stop: int, mode: str) -> Any:
    """Advance the dynamics from step ``t_start`` + 1 to ``t_stop`` (inclusive) in ``mode``."""
    if mode not in ("graph", "first_order", "nograd"):
        raise ValueError(f"unknown unroll mode {mode!r}")
    hp_loss = run.hparams if mode == "graph" else run.hparams_detached()
    hp_step = run.hparams_detached() if mode == "nograd" else run.hparams
    for t in range(t_start + 1, t_stop + 1):
        params = run.dynamics.params(state)
        grads, loss = inner_grads(run, params, hp_loss, t, create_graph=(mode == "graph"))
        if mode == "nograd":
            with torch.no_grad():
                state = run.dynamics.step(state, grads, hp_step, t=t, loss=loss)
        else:
            state = run.dynamics.step(state, grads, hp_step, t=t, loss=loss)
        check_state_params(run, state, t)
    return state


def probe_captured(run: Run, strategy: str) -> None:
    """Raise if the inner loss depends on tensors that require grad outside params/hparams.

    Forward and Implicit differentiate w.r.t. ``hparams`` (and ``params0``) explicitly; a
    tensor that requires grad but reaches the loss through a closure or through ``batch`` would
    silently receive no gradient, so it is an error.
    """
    t = run.t0 + 1
    batch = run.batch_at(t)
    if T.any_requires_grad(batch):
        raise ValueError(
            f"{strategy}: the batch contains tensors that require grad; this strategy differentiates "
            "with respect to hparams only. Put those tensors in hparams (or use Reverse())."
        )
    params = {k: v.detach() for k, v in run.dynamics.params(run.state0).items()}
    with torch.enable_grad():
        loss = run.problem.inner_loss(params, run.hparams_detached(), batch)
    if isinstance(loss, Tensor) and loss.requires_grad:
        raise ValueError(
            f"{strategy}: inner_loss depends on tensors that require grad but are neither in params "
            "nor in hparams (captured by a closure, e.g. module parameters not passed to "
            "functional_call). They would silently receive no hypergradient: pass them in hparams, "
            "or set requires_grad=False on them."
        )


Strategy = Callable[[Run], InnerState]

__all__ = ["InnerState", "NonFiniteError", "Run", "SolveInfo", "check_loss", "check_state_params", "inner_grads", "probe_captured", "unroll"]

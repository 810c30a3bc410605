"""``solve``: run the inner dynamics and return w_T, differentiable as the strategy says."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, NamedTuple

import torch
from torch import Tensor

from bilevel import _tree as T
from bilevel._engine import InnerState, Run, SolveInfo
from bilevel._tree import Params
from bilevel.hypergrad import Implicit, Reverse, Strategy
from bilevel.problem import BilevelProblem

_STRATEGIES = "Reverse(), Checkpointed(k), Truncated(k), FirstOrder(), NoInner(), Forward(), Implicit(solver)"


def _check_strategy(hypergrad: Any) -> Strategy:
    if isinstance(hypergrad, type) and issubclass(hypergrad, Strategy):
        raise TypeError(f"hypergrad must be a strategy instance, e.g. hypergrad={hypergrad.__name__}(), not the class")
    if not isinstance(hypergrad, Strategy):
        raise TypeError(f"unknown hypergradient strategy {hypergrad!r}; expected one of {_STRATEGIES}")
    return hypergrad


def _check_dynamics(dynamics: Any) -> None:
    for name in ("init", "step", "params"):
        if not callable(getattr(dynamics, name, None)):
            raise TypeError(
                f"dynamics must provide init/step/params methods (see bilevel.dynamics.Dynamics); "
                f"{type(dynamics).__name__} has no callable {name!r}"
            )


def solve(
    problem: BilevelProblem,
    params0: Params | InnerState,
    hparams: Params,
    batch: Any,
    *,
    dynamics: Any,
    steps: int,
    hypergrad: Strategy | None = None,
    return_state: bool = False,
    return_info: bool = False,
    linsolve_init: Params | None = None,
    check_finite: bool = True,
) -> Params | tuple[Any, ...]:
    """Run T steps of the inner dynamics and return w_T, differentiable as ``hypergrad`` says.

    Invariant: w_0 = ``params0``, s_0 = dynamics.init(w_0, λ), s_t = Φ_t(s_{t−1}, λ) with
    Φ_t = ``dynamics.step`` fed g_t = ∇_w inner_loss(w_{t−1}, λ, B_t); returns w_T = params(s_T).
    Backpropagating ``problem.outer_loss(w_T, hparams, val_batch)`` yields the hypergradient
    df/dλ = ∂E/∂λ + (dw_T/dλ)ᵀ ∂E/∂w as computed by the strategy (exact for Reverse,
    Checkpointed, Forward and Truncated(T); see :mod:`bilevel.hypergrad`), and, for unrolled
    strategies, df/dw_0 when ``params0`` requires grad (MAML-style initialisations).

    Under ``torch.no_grad()`` every strategy just runs the dynamics (inference-time adaptation).

    Args:
        problem: the :class:`BilevelProblem` (inner and outer losses).
        params0: w_0 as a dict of floating tensors (e.g. ``dict(model.named_parameters())``), or
            an :class:`InnerState` from a previous ``solve(..., return_state=True)`` to continue
            that run (its state is taken as a constant, except Forward's carried tangents).
        hparams: λ as a dict of tensors; entries with ``requires_grad=True`` are differentiated.
        batch: the inner data: one batch reused at every step, or a callable ``t -> batch`` for
            t = 1..T (mini-batches B_t ⊂ D_tr, Franceschi et al. 2018 §2).
        dynamics: Φ — e.g. ``GradientDescent(lr=0.1)``, ``HeavyBall``, ``Adam`` or your own.
        steps: T ≥ 1.
        hypergrad: the strategy (default ``Reverse()``).
        return_state: also return the :class:`InnerState` to continue the run later (online HO,
            warm starts). Continuing from it keeps Implicit's optimality scale of the cold start.
        return_info: also return a :class:`SolveInfo`: Implicit's optimality residual at w_T is
            set on return; its linear-solve residual and solution ``info.linear`` /
            ``info.linear_solution`` are filled in by the backward pass through w_T — read them
            after ``loss.backward()`` (or ``torch.autograd.grad``).
        linsolve_init: Implicit only — the initial guess u_0 of the backward pass's linear solve
            (shaped like params), e.g. ``info.linear_solution`` of the previous outer step.
        check_finite: raise ``ValueError`` naming the step when the inner loss is not finite.

    Returns:
        w_T as a dict with the keys and shapes of ``params0``; with ``return_state=True`` and/or
        ``return_info=True``, the tuple (w_T, state) / (w_T, info) / (w_T, state, info).

    Reference: Franceschi et al. (2018), eq. (1.3)–(1.4).
    """
    if not isinstance(problem, BilevelProblem):
        raise TypeError(f"problem must be a bilevel.BilevelProblem, got {type(problem).__name__}")
    strategy = _check_strategy(Reverse() if hypergrad is None else hypergrad)
    _check_dynamics(dynamics)
    if isinstance(steps, bool) or not isinstance(steps, int):
        raise TypeError(f"steps must be an int, got {type(steps).__name__}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    T.check_tensor_dict(hparams, "hparams", allow_empty=True)
    strategy.validate(steps)
    if linsolve_init is not None and not isinstance(strategy, Implicit):
        raise ValueError(
            f"linsolve_init is the initial guess of Implicit()'s linear solve; hypergrad={strategy!r} solves none"
        )
    info = SolveInfo(strategy, steps)
    collector = _COLLECTOR.get()
    if collector is not None:
        collector.append(info)

    if isinstance(params0, InnerState):
        state0 = params0.dynamics_state
        params_ref = {k: v.detach() for k, v in dynamics.params(state0).items()}
        T.check_tensor_dict(params_ref, "params of the InnerState", floating=True)
        run = Run(problem, dynamics, dict(hparams), batch, steps, check_finite, params_ref, None, state0,
                  params0.t, params0.tangents, params0.tangent_keys, params0.optimality_scale, linsolve_init, info)
    else:
        T.check_tensor_dict(params0, "params0", floating=True)
        params0 = dict(params0)
        state0 = dynamics.init(params0, dict(hparams))
        T.check_like(params0, dynamics.params(state0), "params returned by dynamics.init")
        run = Run(problem, dynamics, dict(hparams), batch, steps, check_finite, params0, params0, state0,
                  linsolve_x0=linsolve_init, info=info)

    if not torch.is_grad_enabled():
        from bilevel.hypergrad import NoInner

        state, params = NoInner().run(run)
    else:
        if strategy.differentiable and not _anything_to_differentiate(run):
            raise ValueError(
                f"hypergrad={strategy!r} has nothing to differentiate: no tensor in hparams "
                f"(keys {list(hparams)}) or params0 requires grad. Set requires_grad=True on the outer "
                "variables, or run under torch.no_grad() / use NoInner() for adaptation only."
            )
        state, params = strategy.run(run)
    out: tuple[Any, ...] = (params, *((state,) if return_state else ()), *((info,) if return_info else ()))
    return out if len(out) > 1 else params


_COLLECTOR: ContextVar[list[SolveInfo] | None] = ContextVar("bilevel_solve_infos", default=None)


@contextmanager
def collect_solve_info() -> Iterator[list[SolveInfo]]:
    """Collect the :class:`SolveInfo` of every :func:`solve` called inside the ``with`` block.

    For code that calls ``solve`` out of sight (a meta-learner's forward pass), this is how a
    caller reads the certificates: ``with collect_solve_info() as infos: loss.backward()`` — after
    the backward pass the infos' linear-solve fields are filled in too. The collection is
    explicit and scoped (a context variable; worker threads that run in a copy of the context,
    as :class:`bilevel.parallel.TaskThreads` does, add to the same list).

    Yields:
        The list the infos are appended to, in call order.
    """
    infos: list[SolveInfo] = []
    token = _COLLECTOR.set(infos)
    try:
        yield infos
    finally:
        _COLLECTOR.reset(token)


def worst_residuals(infos: list[SolveInfo]) -> dict[str, float]:
    """The largest optimality and linear-solve residuals among ``infos`` (keys absent if none was measured)."""
    out: dict[str, float] = {}
    opt = [i.optimality for i in infos if i.optimality is not None]
    lin = [i.linear.residual for i in infos if i.linear is not None]
    if opt:
        out["optimality"] = max(opt)
    if lin:
        out["linear_residual"] = max(lin)
    return out


def _anything_to_differentiate(run: Run) -> bool:
    if any(v.requires_grad for v in run.hparams.values()):
        return True
    if run.params0 is not None and any(v.requires_grad for v in run.params0.values()):
        return True
    if run.batch_is_fn:
        return True  # cannot inspect future batches without drawing them; let autograd decide
    return T.any_requires_grad(run.batch)


class Hypergradient(NamedTuple):
    """Result of :func:`hypergradient`: the outer loss f(λ), its gradients and what was measured.

    Attributes:
        value: f(λ) = E(w_T, λ), detached.
        hparams: df/dλ for the ``hparams`` entries that require grad.
        params0: df/dw_0 for the ``params0`` entries that require grad (empty when continuing
            from a state).
        info: the :class:`SolveInfo` of the inner solve, complete (the backward pass has run):
            Implicit's optimality residual and linear-solve residual.
    """

    value: Tensor
    hparams: Params
    params0: Params
    info: SolveInfo | None = None


class HypergradientState(NamedTuple):
    """What an outer loop carries from one :func:`hypergradient` call to the next (explicit state).

    Attributes:
        inner: where the next inner run starts: w_0 (a dict, from :func:`hypergradient_init`) or
            the detached :class:`InnerState` where the previous run stopped (warm-started inner
            variable; it also carries Implicit's optimality scale of the cold start).
        linsolve: the previous linear-solve solution u (detached, shaped like params), the
            initial guess of the next solve; set only for ``Implicit(..., warm_start=True)``.
    """

    inner: Params | InnerState
    linsolve: Params | None = None


def hypergradient_init(params0: Params) -> HypergradientState:
    """The state of an outer loop before its first step: the inner run starts at ``params0``.

    Use with ``hg, state = hypergradient(problem, state, ..., return_state=True)``.
    """
    T.check_tensor_dict(params0, "params0", floating=True)
    return HypergradientState(dict(params0), None)


def hypergradient(
    problem: BilevelProblem,
    params0: Params | HypergradientState,
    hparams: Params,
    batch: Any,
    outer_batch: Any,
    *,
    dynamics: Any,
    steps: int,
    hypergrad: Strategy | None = None,
    check_finite: bool = True,
    return_state: bool = False,
) -> Hypergradient | tuple[Hypergradient, HypergradientState]:
    """Compute f(λ) = E(w_T(λ), λ) and its gradient; no side effects on ``.grad``.

    One step of an outer loop in init/step style: with ``params0`` a :class:`HypergradientState`
    (from :func:`hypergradient_init` or a previous call) the inner run continues from where the
    previous one stopped (warm-started inner variable), and ``Implicit(..., warm_start=True)``
    starts its linear solve from the previous solution u — the warm starts of AmIGO (Arbel &
    Mairal 2022) and SOBA (Dagréou et al. 2022) in a deterministic outer loop. Without a state
    (``params0`` a dict), it is exactly one cold :func:`solve` and one backward pass.

    For unrolled strategies a warm-started run differentiates through its own T steps only (the
    incoming state is a constant, as in :func:`solve`); for Implicit the hypergradient depends on
    the end point only, so warm starts just make it cheaper and more accurate.

    Args:
        problem, hparams, batch, dynamics, steps, hypergrad, check_finite: as in :func:`solve`.
        params0: w_0 (dict of tensors) or a :class:`HypergradientState`.
        outer_batch: the data of the outer objective (e.g. the validation set or query set).
        return_state: also return the :class:`HypergradientState` for the next call.

    Returns:
        ``Hypergradient(value, hparams, params0, info)``: the outer loss (detached), dicts with
        the gradients for the ``hparams`` and ``params0`` entries that require grad (entries that
        do not influence f get zeros) and the solve's :class:`SolveInfo`; with
        ``return_state=True``, the pair (Hypergradient, HypergradientState).

    Reference: Franceschi et al. (2018), eq. (1.3)–(1.4); Dagréou, Ablin, Vaiter, Moreau (2022),
    *A framework for bilevel optimization that enables stochastic and global variance reduction
    algorithms* (warm-started linear systems).
    """
    strategy = _check_strategy(Reverse() if hypergrad is None else hypergrad)
    warm_u = isinstance(strategy, Implicit) and strategy.warm_start
    if isinstance(params0, HypergradientState):
        start, x0 = params0.inner, (params0.linsolve if warm_u else None)
    else:
        start, x0 = params0, None
    w_t, inner, info = solve(problem, start, hparams, batch, dynamics=dynamics, steps=steps, hypergrad=strategy,
                             return_state=True, return_info=True, linsolve_init=x0, check_finite=check_finite)
    value = problem.outer_loss(w_t, hparams, outer_batch)  # type: ignore[arg-type]
    if not isinstance(value, Tensor) or value.numel() != 1:
        raise ValueError("outer_loss must return a scalar tensor")
    hp = {k: v for k, v in hparams.items() if v.requires_grad}
    p0 = {k: v for k, v in start.items() if v.requires_grad} if not isinstance(start, InnerState) else {}
    inputs = list(hp.values()) + list(p0.values())
    grads = torch.autograd.grad(value.reshape(()), inputs, allow_unused=True) if value.requires_grad else [None] * len(inputs)
    grads = [g if g is not None else torch.zeros_like(x) for g, x in zip(grads, inputs)]
    result = Hypergradient(value.detach(), dict(zip(hp, grads[: len(hp)])), dict(zip(p0, grads[len(hp):])), info)
    if not return_state:
        return result
    # detached: the linked w_T would keep this step's graph (and, through it, every earlier one) alive
    inner = InnerState(T.detach(inner.dynamics_state), inner.t, T.detach(inner.tangents), inner.tangent_keys,
                       inner.optimality_scale)
    return result, HypergradientState(inner, info.linear_solution if warm_u else None)


__all__ = ["Hypergradient", "HypergradientState", "InnerState", "SolveInfo", "collect_solve_info", "hypergradient",
           "hypergradient_init", "solve", "worst_residuals"]

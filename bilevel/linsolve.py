"""Matrix-free linear solvers for implicit differentiation.

Each solver returns u ≈ A⁻¹ b for a linear operator A given only by its action
``matvec(u) = A u`` on dicts of tensors shaped like ``params``, together with a
:class:`LinearSolveInfo` (iterations, matvecs, relative residual ‖b − A u‖/‖b‖). In
:class:`bilevel.hypergrad.Implicit`, A = (∂F/∂w)ᵀ at the inner solution, where F(w, λ) = 0 is the
optimality condition; for the default condition F = ∇_w L this is the inner Hessian, so A u is a
Hessian-vector product.

* :class:`CG` — conjugate gradient; needs A symmetric positive definite (gradient conditions
  of strongly convex inner problems).
* :class:`Neumann` — truncated Neumann series u = α Σ_{k=0}^{K} (I − αA)^k b, i.e. K steps of
  Richardson iteration with step α; converges when the spectral radius of I − αA is below 1
  (Lorraine et al. 2020).
* :class:`FixedPoint` — fixed-point iteration u ← b + (I − A) u. With the fixed-point condition
  F(w) = w − Φ(w, λ) this is u ← b + (∂Φ/∂w)ᵀ u, the classical fixed-point hypergradient
  (hypertorch's ``fixed_point``); with F = ∇L it equals Neumann with α = 1.
* :class:`Exact` — builds A densely (n matvecs) and solves it with an LU factorisation; for small
  problems and for testing.

Every solver accepts an initial guess ``x0`` (warm start, e.g. the solution of the previous outer
step as in AmIGO, Arbel & Mairal 2022, and SOBA, Dagréou et al. 2022); ``x0=None`` is the cold
start u_0 = 0 (u_0 = b for FixedPoint) and reproduces the solvers' results without warm starts.
Neumann and FixedPoint raise :class:`DivergenceError` when their iterates grow (the spectral
radius of the iteration is above 1) or become non-finite, instead of returning a meaningless u.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from bilevel import _tree as T
from bilevel._tree import Params

MatVec = Callable[[Params], Params]


class LinearSolveInfo(NamedTuple):
    """What a linear solve did: returned next to the solution by every :class:`LinearSolver`.

    Attributes:
        iterations: iterations of the method (CG steps, Neumann terms, fixed-point updates;
            n for :class:`Exact`).
        matvecs: products A u evaluated, including the one for the initial residual of a warm
            start and the one that certifies the final residual (Neumann, FixedPoint).
        residual: the relative residual ‖b − A u‖ / ‖b‖ of the returned u (0 when b = 0),
            evaluated with one more matvec (CG's recursively updated residual, which it uses to
            stop, drifts from the true one in float32).
        breakdown: CG stopped at non-positive curvature pᵀAp ≤ 0 (A is not positive definite).
    """

    iterations: int
    matvecs: int
    residual: float
    breakdown: bool = False


class DivergenceError(ValueError):
    """A linear solver's iterates grew or became non-finite; the message holds the numbers."""


class LinearSolver:
    """Base class: ``solve(matvec, rhs, x0=None) -> (u, LinearSolveInfo)`` with A u ≈ rhs.

    ``str(solver)`` is its text form in the strategy grammar (``cg:30``, ``neumann:50:0.5``,
    ``fixed-point:100``, ``exact``; see :func:`bilevel.hypergrad.from_string`).
    """

    def solve(self, matvec: MatVec, rhs: Params, x0: Params | None = None) -> tuple[Params, LinearSolveInfo]:
        raise NotImplementedError


def _check_int(name: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_nonneg(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0 or math.isinf(value):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def _norm(a: Params) -> float:
    return float(T.dot(a, a).sqrt())


def _initial_guess(x0: Params, rhs: Params, solver: str) -> Params:
    T.check_like(rhs, x0, f"{solver}: the initial guess x0")
    return {k: x0[k].detach().to(dtype=v.dtype, device=v.device) for k, v in rhs.items()}


def _relative(r: float, b: float) -> float:
    return r / b if b > 0 else (0.0 if r == 0 else math.inf)


def _check_divergence(name: str, r_first: float, r_prev: float, r_last: float, b_norm: float, iterations: int,
                      advice: str) -> None:
    """Raise :class:`DivergenceError` if the residual is non-finite or grew over the iterations."""
    finite = math.isfinite(r_last) and math.isfinite(r_prev)
    if finite and not (r_last > r_first and r_last > r_prev):
        return
    what = "became non-finite" if not finite else (
        f"grew from {r_first:.3e} to {r_last:.3e} (relative to ‖b‖ = {b_norm:.3e}: {_relative(r_last, b_norm):.3e})"
    )
    rate = f"; the last iteration multiplied it by {r_last / r_prev:.3g}" if finite and r_prev > 0 else ""
    raise DivergenceError(f"{name} diverges: the residual ‖b − A u‖ {what} over {iterations} iterations{rate}. {advice}")


@dataclass(frozen=True)
class CG(LinearSolver):
    """Conjugate gradient for symmetric positive-definite A.

    Stops after ``maxiter`` matvecs or when its recursive residual ‖r‖ ≤ tol·‖b‖ (r = b − A u in
    exact arithmetic); one more matvec evaluates the true residual of the result for the info.
    Detecting non-positive curvature pᵀAp ≤ 0 (A not positive definite: the inner solution is
    not a strict minimum) stops early with a warning and ``info.breakdown``.

    Args:
        maxiter: maximum number of iterations (Hessian-vector products).
        tol: relative residual tolerance (early stopping).
    """

    maxiter: int = 100
    tol: float = 1e-10

    def __post_init__(self) -> None:
        _check_int("CG maxiter", self.maxiter, 1)
        _check_nonneg("CG tol", self.tol)

    def __str__(self) -> str:
        return f"cg:{self.maxiter}" + (f":{self.tol!r}" if self.tol != CG.tol else "")

    def solve(self, matvec: MatVec, rhs: Params, x0: Params | None = None) -> tuple[Params, LinearSolveInfo]:
        b_norm = _norm(rhs)
        if b_norm == 0.0:
            return T.zeros_like(rhs), LinearSolveInfo(0, 0, 0.0)
        matvecs = 0
        if x0 is None:
            x = T.zeros_like(rhs)
            r = dict(rhs)
        else:
            x = _initial_guess(x0, rhs, "CG")
            r = T.sub(rhs, matvec(x))
            matvecs = 1
        p = dict(r)
        rs = T.dot(r, r)
        r_norm = float(rs.sqrt())
        if x0 is not None and r_norm <= self.tol * b_norm:
            return x, LinearSolveInfo(0, matvecs, r_norm / b_norm)
        i, breakdown = 0, False
        for i in range(1, self.maxiter + 1):
            ap = matvec(p)
            matvecs += 1
            pap = T.dot(p, ap)
            if float(pap) <= 0.0:
                warnings.warn(
                    f"CG: non-positive curvature pᵀAp={float(pap):.3e} at iteration {i - 1}; the system is not "
                    "positive definite (is the inner solution a strict minimum?). Returning the current iterate "
                    f"(relative residual {r_norm / b_norm:.3e}).",
                    RuntimeWarning,
                    stacklevel=3,
                )
                i, breakdown = i - 1, True
                break
            alpha = rs / pap
            x = T.add(x, p, alpha)
            r = T.add(r, ap, -alpha)
            rs_new = T.dot(r, r)
            r_norm = float(rs_new.sqrt())
            if r_norm <= self.tol * b_norm:
                break
            p = T.add(r, p, rs_new / rs)
            rs = rs_new
        residual = _norm(T.sub(rhs, matvec(x))) / b_norm
        return x, LinearSolveInfo(i, matvecs + 1, residual, breakdown)


@dataclass(frozen=True)
class Neumann(LinearSolver):
    """Truncated Neumann series u = α Σ_{k=0}^{K} (I − αA)^k b (K = ``maxiter`` matvecs).

    Equivalently K + 1 Richardson steps u ← u + α (b − A u) from u = 0 (or from ``x0``: then
    u = x0 + α Σ_k (I − αA)^k (b − A x0)). One more matvec evaluates the residual of the result.
    If the residual grows (α ≥ 2/λ_max(A), or A has eigenvalues ≤ 0) or becomes non-finite, it
    raises :class:`DivergenceError` with the growth factor and a bound for α.

    Args:
        maxiter: number of terms K beyond the first (= matvecs).
        alpha: the step α; choose α < 2/λ_max(A) for convergence (for F = ∇L, α plays the role of
            an inner learning rate).

    Reference: Lorraine, Vicol, Duvenaud (2020), *Optimizing Millions of Hyperparameters by
    Implicit Differentiation*, eq. (9).
    """

    maxiter: int = 50
    alpha: float = 0.1

    def __post_init__(self) -> None:
        _check_int("Neumann maxiter", self.maxiter, 0)
        if not isinstance(self.alpha, (int, float)) or not self.alpha > 0 or math.isinf(self.alpha):
            raise ValueError(f"Neumann alpha must be a finite number > 0, got {self.alpha!r}")

    def __str__(self) -> str:
        return f"neumann:{self.maxiter}:{float(self.alpha)!r}"

    def solve(self, matvec: MatVec, rhs: Params, x0: Params | None = None) -> tuple[Params, LinearSolveInfo]:
        b_norm = _norm(rhs)
        if x0 is None:
            term = dict(rhs)
            matvecs = 0
        else:
            x0 = _initial_guess(x0, rhs, "Neumann")
            term = T.sub(rhs, matvec(x0))
            matvecs = 1
        r_first = _norm(term) if x0 is not None else b_norm
        acc = dict(term)
        for _ in range(self.maxiter):
            term = T.add(term, matvec(term), -self.alpha)
            acc = T.add(acc, term)
        u = T.scale(acc, self.alpha) if x0 is None else T.add(x0, acc, self.alpha)
        r_prev = _norm(term)
        r_last = _norm(T.add(term, matvec(term), -self.alpha))  # b − A u = (I − αA)^{K+1} (b − A x0)
        matvecs += self.maxiter + 1
        if b_norm == 0.0 and r_last == 0.0:
            return u, LinearSolveInfo(self.maxiter, matvecs, 0.0)
        rho = r_last / r_prev if r_prev > 0 and math.isfinite(r_last) else math.inf
        bound = f"alpha below ≈ {2 * self.alpha / (1 + rho):.3g}" if math.isfinite(rho) else "a smaller alpha"
        _check_divergence(
            f"Neumann(maxiter={self.maxiter}, alpha={self.alpha:g})", r_first, r_prev, r_last, b_norm, self.maxiter + 1,
            f"The series converges only when the spectral radius of I − αA is below 1 (α < 2/λ_max(A), A positive "
            f"definite); use {bound}, or CG for symmetric positive-definite systems.",
        )
        return u, LinearSolveInfo(self.maxiter, matvecs, _relative(r_last, b_norm))


@dataclass(frozen=True)
class FixedPoint(LinearSolver):
    """Fixed-point iteration u ← b + (I − A) u, stopped when ‖Δu‖ ≤ tol·‖u‖.

    With ``Implicit(FixedPoint(...), condition=fixed_point_condition(phi))`` the iteration is
    u ← b + (∂Φ/∂w)ᵀ u, which converges when Φ is a contraction near the solution. Starts from
    u = b (or ``x0``); one more matvec evaluates the residual of the result. If the residual
    grows (Φ is not a contraction) or becomes non-finite, it raises :class:`DivergenceError`.

    Args:
        maxiter: maximum number of iterations (matvecs).
        tol: relative tolerance on the update.
    """

    maxiter: int = 100
    tol: float = 1e-10

    def __post_init__(self) -> None:
        _check_int("FixedPoint maxiter", self.maxiter, 1)
        _check_nonneg("FixedPoint tol", self.tol)

    def __str__(self) -> str:
        return f"fixed-point:{self.maxiter}" + (f":{self.tol!r}" if self.tol != FixedPoint.tol else "")

    def solve(self, matvec: MatVec, rhs: Params, x0: Params | None = None) -> tuple[Params, LinearSolveInfo]:
        b_norm = _norm(rhs)
        u = dict(rhs) if x0 is None else _initial_guess(x0, rhs, "FixedPoint")
        r_first = r_prev = math.nan
        it = 0
        for it in range(1, self.maxiter + 1):
            au = matvec(u)
            delta = T.sub(rhs, au)  # u_new - u = b - A u
            u = T.add(u, delta)
            r_prev = _norm(delta)
            if it == 1:
                r_first = r_prev
            if not math.isfinite(r_prev) or r_prev <= self.tol * _norm(u):
                break
        r_last = _norm(T.sub(rhs, matvec(u))) if math.isfinite(r_prev) else math.nan
        _check_divergence(
            f"FixedPoint(maxiter={self.maxiter})", r_first, r_prev, r_last, b_norm, it,
            "The iteration u ← b + (I − A) u converges only when the spectral radius of I − A is below 1 (with "
            "fixed_point_condition(phi): when phi is a contraction near the solution; e.g. a smaller step in phi); "
            "use CG for symmetric positive-definite systems.",
        )
        return u, LinearSolveInfo(it, it + 1, _relative(r_last, b_norm))


@dataclass(frozen=True)
class Exact(LinearSolver):
    """Dense solve: builds A column by column (n matvecs) and solves with LU. Small problems only.

    ``x0`` is accepted and ignored (the solve is direct).
    """

    max_size: int = 20_000

    def __str__(self) -> str:
        return "exact" + (f":{self.max_size}" if self.max_size != Exact.max_size else "")

    def solve(self, matvec: MatVec, rhs: Params, x0: Params | None = None) -> tuple[Params, LinearSolveInfo]:
        n = T.numel(rhs)
        if n > self.max_size:
            raise ValueError(
                f"Exact(): the system has n={n} unknowns, above max_size={self.max_size}; "
                "use CG/Neumann/FixedPoint or raise Exact(max_size=...)"
            )
        b = T.flatten(rhs)
        cols = []
        eye = torch.eye(n, dtype=b.dtype, device=b.device)
        for i in range(n):
            cols.append(T.flatten(matvec(T.unflatten(eye[i], rhs))))
        a = torch.stack(cols, dim=1)
        u, info = torch.linalg.solve_ex(a, b)
        if int(info) != 0 or not bool(torch.isfinite(u).all()):
            raise ValueError(
                "Exact(): the linear system of the optimality condition is singular; the inner "
                "solution is not unique (add regularisation to the inner loss or use CG/Neumann)"
            )
        b_norm = float(torch.linalg.vector_norm(b))
        residual = _relative(float(torch.linalg.vector_norm(a @ u - b)), b_norm)
        return T.unflatten(u, rhs), LinearSolveInfo(n, n, residual)


__all__ = ["CG", "DivergenceError", "Exact", "FixedPoint", "LinearSolveInfo", "LinearSolver", "Neumann"]

"""Matrix-free linear solvers for implicit differentiation.

Each solver returns u ≈ A⁻¹ b for a linear operator A given only by its action
``matvec(u) = A u`` on dicts of tensors shaped like ``params``. In :class:`bilevel.hypergrad.Implicit`,
A = (∂F/∂w)ᵀ at the inner solution, where F(w, λ) = 0 is the optimality condition; for the
default condition F = ∇_w L this is the inner Hessian, so A u is a Hessian-vector product.

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
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from bilevel import _tree as T
from bilevel._tree import Params

MatVec = Callable[[Params], Params]


class LinearSolver:
    """Base class: ``solve(matvec, rhs) -> u`` with A u ≈ rhs."""

    def solve(self, matvec: MatVec, rhs: Params) -> Params:
        raise NotImplementedError


def _check_int(name: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_nonneg(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0 or math.isinf(value):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


@dataclass(frozen=True)
class CG(LinearSolver):
    """Conjugate gradient for symmetric positive-definite A.

    Stops after ``maxiter`` matvecs or when ‖b − A u‖ ≤ tol·‖b‖. Detecting non-positive
    curvature pᵀAp ≤ 0 (A not positive definite: the inner solution is not a strict minimum)
    stops early with a warning.

    Args:
        maxiter: maximum number of iterations (Hessian-vector products).
        tol: relative residual tolerance.
    """

    maxiter: int = 100
    tol: float = 1e-10

    def __post_init__(self) -> None:
        _check_int("CG maxiter", self.maxiter, 1)
        _check_nonneg("CG tol", self.tol)

    def solve(self, matvec: MatVec, rhs: Params) -> Params:
        x = T.zeros_like(rhs)
        r = dict(rhs)
        p = dict(rhs)
        rs = T.dot(r, r)
        b_norm = float(rs.sqrt())
        if b_norm == 0.0:
            return x
        for i in range(self.maxiter):
            ap = matvec(p)
            pap = T.dot(p, ap)
            if float(pap) <= 0.0:
                warnings.warn(
                    f"CG: non-positive curvature pᵀAp={float(pap):.3e} at iteration {i}; the system is not "
                    "positive definite (is the inner solution a strict minimum?). Returning the current iterate.",
                    RuntimeWarning,
                    stacklevel=3,
                )
                break
            alpha = rs / pap
            x = T.add(x, p, alpha)
            r = T.add(r, ap, -alpha)
            rs_new = T.dot(r, r)
            if float(rs_new.sqrt()) <= self.tol * b_norm:
                break
            p = T.add(r, p, rs_new / rs)
            rs = rs_new
        return x


@dataclass(frozen=True)
class Neumann(LinearSolver):
    """Truncated Neumann series u = α Σ_{k=0}^{K} (I − αA)^k b (K = ``maxiter`` matvecs).

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

    def solve(self, matvec: MatVec, rhs: Params) -> Params:
        term = dict(rhs)
        acc = dict(rhs)
        for _ in range(self.maxiter):
            term = T.add(term, matvec(term), -self.alpha)
            acc = T.add(acc, term)
        return T.scale(acc, self.alpha)


@dataclass(frozen=True)
class FixedPoint(LinearSolver):
    """Fixed-point iteration u ← b + (I − A) u, stopped when ‖Δu‖ ≤ tol·‖u‖.

    With ``Implicit(FixedPoint(...), condition=fixed_point_condition(phi))`` the iteration is
    u ← b + (∂Φ/∂w)ᵀ u, which converges when Φ is a contraction near the solution.

    Args:
        maxiter: maximum number of iterations (matvecs).
        tol: relative tolerance on the update.
    """

    maxiter: int = 100
    tol: float = 1e-10

    def __post_init__(self) -> None:
        _check_int("FixedPoint maxiter", self.maxiter, 1)
        _check_nonneg("FixedPoint tol", self.tol)

    def solve(self, matvec: MatVec, rhs: Params) -> Params:
        u = dict(rhs)
        for _ in range(self.maxiter):
            au = matvec(u)
            delta = T.sub(rhs, au)  # u_new - u = b - A u
            u = T.add(u, delta)
            if float(T.dot(delta, delta).sqrt()) <= self.tol * float(T.dot(u, u).sqrt()):
                break
        return u


@dataclass(frozen=True)
class Exact(LinearSolver):
    """Dense solve: builds A column by column (n matvecs) and solves with LU. Small problems only."""

    max_size: int = 20_000

    def solve(self, matvec: MatVec, rhs: Params) -> Params:
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
        return T.unflatten(u, rhs)


__all__ = ["CG", "Exact", "FixedPoint", "LinearSolver", "Neumann"]

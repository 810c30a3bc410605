"""Batched, differentiable quadratic programs (OptNet layers).

``solve_qp`` solves, for every problem of a batch,

    z* = argmin_z 1/2 z^T Q z + p^T z   s.t.  G z <= h,  A z = b

and differentiates ``z*`` by the implicit function theorem on the KKT conditions (Amos & Kolter
2017, "OptNet"; Barratt 2018; MetaOptNet, Lee et al. 2019, eq. 5-8). The native backend is a
float64 Mehrotra interior-point method whose Newton systems are regularised Cholesky
factorisations, so PSD and singular ``Q`` (duplicated points, all-zero features) never fail;
converged iterates are polished on their active set, so solutions and gradients are exact to
round-off. ``backend="qpth"`` runs the same problem on qpth (optional dependency).

``solve_crammer_singer_dual`` is the structured solver for MetaOptNet's SVM dual (eq. 10), whose
Hessian ``kron(K, I)`` is block-diagonal per class; it is exact (active-set method) and much
faster than the generic layer on that problem, with the same implicit backward pass.

Example::

    z, info = solve_qp(Q, p, G, h, A, b, return_info=True)   # z [B, n]; info.residual [B]
    z.sum().backward()                                       # dL/dQ, dL/dp, dL/dG, ... (KKT)
    z3 = solve_qp(Q, p, G, h, A, b, max_iter=3)               # MetaOptNet's early stopping

Scaling note: multipliers are reported for the problem as given; the solvers work internally
on a copy rescaled to unit size. ``Q`` is symmetrised as ``(Q + Q^T) / 2``.
"""
from __future__ import annotations

import warnings
from typing import Literal

import torch
from torch import Tensor

from ._common import WORK_DTYPE, QPInfo, finite_or_raise
from ._cs import CSDualFunction
from ._dense import DenseQPFunction, kkt_residual

__all__ = ["QPInfo", "kkt_residual", "solve_crammer_singer_dual", "solve_qp"]

_DEFAULT_MAX_ITER = 100
_QPTH_DEFAULT_MAX_ITER = 20


def _check_batched(name: str, t: Tensor, core_dims: int) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() not in (core_dims, core_dims + 1):
        raise ValueError(
            f"{name} must have {core_dims} dims (shared by the batch) or {core_dims + 1} (batched), "
            f"got shape {tuple(t.shape)}"
        )
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")


def _batch_size(named: dict[str, tuple[Tensor, int]]) -> int:
    sizes = {name: t.shape[0] for name, (t, d) in named.items() if t.dim() == d + 1}
    distinct = set(sizes.values())
    if len(distinct) > 1:
        raise ValueError(f"inconsistent batch sizes: {sizes}")
    return distinct.pop() if distinct else 1


def _pair(name_a: str, a: Tensor | None, name_b: str, b: Tensor | None) -> None:
    if (a is None) != (b is None):
        raise ValueError(f"{name_a} and {name_b} must be given together")


def solve_qp(
    Q: Tensor,
    p: Tensor,
    G: Tensor | None = None,
    h: Tensor | None = None,
    A: Tensor | None = None,
    b: Tensor | None = None,
    *,
    backend: Literal["native", "qpth"] = "native",
    max_iter: int | None = None,
    tol: float = 1e-10,
    return_info: bool = False,
) -> Tensor | tuple[Tensor, QPInfo]:
    """Solve a batch of convex QPs and differentiate the solution implicitly.

    Invariant: the returned ``z`` satisfies the KKT conditions (MetaOptNet eq. 7) to ``tol``
    (scaled units) unless ``max_iter`` stops the solver first; gradients are
    ``-D_theta g (D_z g)^-1`` of those conditions (eq. 8, OptNet eq. 7-8) evaluated at the returned
    iterate, w.r.t. ``Q, p, G, h, A, b`` (all cheap: one extra factorisation).

    Args:
        Q: [B, n, n] or [n, n] symmetric positive semi-definite.
        p: [B, n] or [n].
        G: [B, m, n] or [m, n] inequality matrix (optional, with ``h``).
        h: [B, m] or [m].
        A: [B, k, n] or [k, n] equality matrix (optional, with ``b``).
        b: [B, k] or [k].
        backend: ``"native"`` (default; float64 inside, robust) or ``"qpth"`` (optional
            dependency, runs in the input dtype, needs positive-definite ``Q``).
        max_iter: interior-point iteration cap. ``None``: 100 (native) / 20 (qpth). A small cap
            (e.g. 3) reproduces MetaOptNet's early stopping (§4.1).
        tol: stopping tolerance on the scaled KKT residual.
        return_info: also return a :class:`QPInfo` (for qpth this reruns its forward to read
            the multipliers).

    Returns:
        ``z`` [B, n] in the promoted input dtype (``B = 1`` when nothing is batched), or
        ``(z, info)`` when ``return_info``.

    Raises:
        ValueError: bad shapes, non-finite data, unknown backend, ``max_iter < 1``, ``tol <= 0``.
        RuntimeError: the qpth backend failed (its message is kept).
    """
    _pair("G", G, "h", h)
    _pair("A", A, "b", b)
    named: dict[str, tuple[Tensor, int]] = {"Q": (Q, 2), "p": (p, 1)}
    if G is not None and h is not None:
        named.update(G=(G, 2), h=(h, 1))
    if A is not None and b is not None:
        named.update(A=(A, 2), b=(b, 1))
    for name, (t, d) in named.items():
        _check_batched(name, t, d)
    n = p.shape[-1]
    if Q.shape[-2:] != (n, n):
        raise ValueError(f"Q must be [B, {n}, {n}] to match p {tuple(p.shape)}, got {tuple(Q.shape)}")
    if G is not None and h is not None and (G.shape[-1] != n or G.shape[-2] != h.shape[-1]):
        raise ValueError(f"G {tuple(G.shape)} and h {tuple(h.shape)} do not match n={n}")
    if A is not None and b is not None and (A.shape[-1] != n or A.shape[-2] != b.shape[-1]):
        raise ValueError(f"A {tuple(A.shape)} and b {tuple(b.shape)} do not match n={n}")
    if max_iter is not None and max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    if not tol > 0:
        raise ValueError(f"tol must be > 0, got {tol}")
    for name, (t, _) in named.items():
        finite_or_raise(name, t)
    B = _batch_size(named)
    out_dtype = Q.dtype
    for t, _ in named.values():
        out_dtype = torch.promote_types(out_dtype, t.dtype)

    if backend == "qpth":
        from ._qpth import qpth_duals, qpth_inputs, solve_qpth

        it = max_iter if max_iter is not None else _QPTH_DEFAULT_MAX_ITER
        Gq, hq, Aq, bq = qpth_inputs(G, h, A, b, p, n)
        args = [t.to(out_dtype) for t in (Q, p, Gq, hq, Aq, bq)]
        z = solve_qpth(*args, max_iter=it, tol=tol)
        if z.shape[0] != B:
            z = z.expand(B, n)
        if not return_info:
            return z
        zq, lam, nu = qpth_duals(*[t.detach() for t in args], max_iter=it, tol=tol)
        ex = [_expand(t.detach().to(WORK_DTYPE), B, d) for t, d in zip(args, (2, 1, 2, 1, 2, 1))]
        if ex[4].numel() == 0:
            ex[4], ex[5] = ex[0].new_zeros(B, 0, n), ex[0].new_zeros(B, 0)
        res = kkt_residual(*ex, zq.to(WORK_DTYPE), lam.to(WORK_DTYPE), nu.to(WORK_DTYPE))
        info = QPInfo(res, torch.full((B,), it), res <= tol)
        return z, info
    if backend != "native":
        raise ValueError(f"backend must be 'native' or 'qpth', got {backend!r}")

    dev = p.device
    Qe = _expand(Q.to(WORK_DTYPE), B, 2)
    pe = _expand(p.to(WORK_DTYPE), B, 1)
    if G is not None and h is not None:
        Ge, he = _expand(G.to(WORK_DTYPE), B, 2), _expand(h.to(WORK_DTYPE), B, 1)
    else:
        Ge, he = torch.zeros(B, 0, n, dtype=WORK_DTYPE, device=dev), torch.zeros(B, 0, dtype=WORK_DTYPE, device=dev)
    if A is not None and b is not None:
        Ae, be = _expand(A.to(WORK_DTYPE), B, 2), _expand(b.to(WORK_DTYPE), B, 1)
    else:
        Ae, be = torch.zeros(B, 0, n, dtype=WORK_DTYPE, device=dev), torch.zeros(B, 0, dtype=WORK_DTYPE, device=dev)
    it = max_iter if max_iter is not None else _DEFAULT_MAX_ITER
    z, _, _, res, iters, conv = DenseQPFunction.apply(Qe, pe, Ge, he, Ae, be, it, tol)
    if max_iter is None and not bool(conv.all()):
        _warn_not_converged("solve_qp", conv, res, "they may be infeasible or unbounded")
    z = z.to(out_dtype)
    return (z, QPInfo(res, iters, conv)) if return_info else z


def _warn_not_converged(where: str, conv: Tensor, res: Tensor, why: str) -> None:
    bad = (~conv).nonzero()[:, 0].tolist()
    warnings.warn(
        f"{where}: {len(bad)} problem(s) did not converge (batch indices {bad[:10]}, KKT residual up to "
        f"{float(res[~conv].max()):.3g}); {why}",
        stacklevel=3,
    )


def _expand(t: Tensor, B: int, core_dims: int) -> Tensor:
    return t.expand(B, *t.shape) if t.dim() == core_dims else t


def solve_crammer_singer_dual(
    gram: Tensor,
    targets: Tensor,
    upper: Tensor,
    *,
    max_iter: int | None = None,
    tol: float = 1e-9,
    return_info: bool = False,
) -> Tensor | tuple[Tensor, QPInfo]:
    """Solve the Crammer-Singer-structured dual QP exactly and differentiate it implicitly.

    Problem (per batch entry; ``alpha`` is ``[n, m]``)::

        min  1/2 sum_k alpha[:, k]^T K alpha[:, k] - <targets, alpha>
        s.t. alpha <= upper,   sum_k alpha[i, k] = 0  (every example i)

    With ``targets = Y`` (one-hot) and ``upper = C Y`` this is MetaOptNet's SVM dual (eq. 10,
    Lee et al. 2019; Crammer & Singer 2001); the primal weights are ``W = alpha^T X`` (eq. 9).
    Equivalent to :func:`solve_qp` with ``Q = kron(K, I_m)``, ``p = -vec(targets)``,
    ``G = I``, ``h = vec(upper)``, ``A = kron(I_n, 1_m^T)``, ``b = 0``, but each linear system
    costs ``m`` factorisations of ``n x n`` blocks instead of one of ``nm x nm``.

    Invariant: with ``max_iter=None`` the result is a KKT point to round-off (active-set method,
    interior-point fallback), and gradients w.r.t. ``gram``, ``targets`` and ``upper`` are the
    implicit derivative on the final active set (exact under strict complementarity).

    Args:
        gram: [B, n, n] PSD Gram matrix ``K = X X^T`` (add ``rho I`` for a dual ridge).
        targets: [B, n, m] linear term (one-hot labels for the SVM).
        upper: [B, n, m] upper bounds; every row must have a positive sum.
        max_iter: ``None`` (default): exact solve. An integer: run the interior-point method for
            at most that many iterations (MetaOptNet's early stopping: 15 train / 3 test).
        tol: KKT tolerance in scaled units (``mean(diag K) = 1``).
        return_info: also return a :class:`QPInfo`.

    Returns:
        ``alpha`` [B, n, m] in the dtype of ``gram``, or ``(alpha, info)``.

    Raises:
        ValueError: shapes, non-finite values, a row of ``upper`` with a non-positive sum,
            ``max_iter < 1`` or ``tol <= 0``.
    """
    for name, t, d in (("gram", gram, 3), ("targets", targets, 3), ("upper", upper, 3)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != d or not t.is_floating_point():
            raise ValueError(f"{name} must be a floating [B, ...] tensor with {d} dims, got {tuple(t.shape)} {t.dtype}")
        finite_or_raise(name, t)
    B, n, m = targets.shape
    if gram.shape != (B, n, n):
        raise ValueError(f"gram must be [B, n, n] = {(B, n, n)} to match targets {tuple(targets.shape)}, got {tuple(gram.shape)}")
    if upper.shape != targets.shape:
        raise ValueError(f"upper {tuple(upper.shape)} must have the shape of targets {tuple(targets.shape)}")
    if not bool((upper.sum(-1) > 0).all()):
        raise ValueError("every row of upper must have a positive sum (otherwise the dual is infeasible)")
    if max_iter is not None and max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    if not tol > 0:
        raise ValueError(f"tol must be > 0, got {tol}")
    alpha, _, _, res, iters, conv = CSDualFunction.apply(
        gram.to(WORK_DTYPE), targets.to(WORK_DTYPE), upper.to(WORK_DTYPE), max_iter, tol, return_info
    )
    if max_iter is None and not bool(conv.all()):
        _warn_not_converged("solve_crammer_singer_dual", conv, res,
                            "the Gram matrix is rank-deficient or badly rounded (the best iterate is returned)")
    alpha = alpha.to(gram.dtype)
    return (alpha, QPInfo(res, iters, conv)) if return_info else alpha

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

Early stopping. ``max_iter`` alone caps the native interior-point method: its k-th iterate is
*not* MetaOptNet's (different initial point, centring and step rules). ``early_stop="qpth"``
with ``max_iter=k`` instead returns exactly what qpth's ``QPFunction(maxIter=k)`` returns (its
batched PDIPM reproduced step for step in float64, see ``_qpth_pdipm``; no qpth needed), and
differentiates it as qpth does (the KKT derivative at that point as if it were optimal). That
is MetaOptNet's early stopping (§4.1: 15 iterations at meta-training, 3 at meta-test, on
``Q = kron(K, I) + 1.0 I``).

Example::

    z, info = solve_qp(Q, p, G, h, A, b, return_info=True)   # z [B, n]; info.residual [B]
    z.sum().backward()                                       # dL/dQ, dL/dp, dL/dG, ... (KKT)
    z3 = solve_qp(Q, p, G, h, A, b, max_iter=3, early_stop="qpth")   # qpth's 3-iteration point

Scaling note: multipliers are reported for the problem as given; the solvers work internally
on a copy rescaled to unit size (except ``early_stop="qpth"``, which like qpth iterates on the
problem as given: its initial shift is not scale-invariant). ``Q`` is symmetrised as ``(Q + Q^T) / 2``.
"""
from __future__ import annotations

import warnings
from typing import Literal

import torch
from torch import Tensor

from ._common import WORK_DTYPE, QPInfo, finite_or_raise
from ._cs import CSDualFunction, _residual
from ._dense import DenseQPFunction, kkt_residual
from ._qpth_pdipm import QPTH_EPS, CSPDIPMFunction, DensePDIPMFunction

__all__ = ["EarlyStop", "QPInfo", "crammer_singer_qp", "kkt_residual", "solve_crammer_singer_dual", "solve_qp"]

_DEFAULT_MAX_ITER = 100
_QPTH_DEFAULT_MAX_ITER = 20

#: Whose iterate ``max_iter`` returns: the native interior-point method's, or qpth's (reproduced).
EarlyStop = Literal["native", "qpth"]
_EARLY_STOPS = ("native", "qpth")


def _check_early_stop(early_stop: str, max_iter: int | None) -> None:
    if early_stop not in _EARLY_STOPS:
        raise ValueError(f"early_stop must be 'native' or 'qpth', got {early_stop!r}")
    if early_stop == "qpth" and max_iter is None:
        raise ValueError(
            "early_stop='qpth' returns qpth's iterate after max_iter iterations: give max_iter "
            "(MetaOptNet: 15 at meta-training, 3 at meta-test), or drop early_stop for the exact solution"
        )


def _require_positive_definite(name: str, M: Tensor, hint: str) -> None:
    """qpth refuses a Hessian without a Cholesky factor ("Q is not SPD"); so does its reproduction."""
    info = torch.linalg.cholesky_ex(M)[1]
    if bool((info != 0).any()):
        bad = (info != 0).nonzero()[:, 0].tolist()
        raise ValueError(
            f"early_stop='qpth' reproduces qpth, which needs a positive-definite {name} (qpth raises "
            f"'Q is not SPD'); not positive definite for batch indices {bad[:10]}. {hint}"
        )


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
    early_stop: EarlyStop = "native",
    tol: float = 1e-10,
    return_info: bool = False,
) -> Tensor | tuple[Tensor, QPInfo]:
    """Solve a batch of convex QPs and differentiate the solution implicitly.

    Invariant: the returned ``z`` satisfies the KKT conditions (MetaOptNet eq. 7) to ``tol``
    (scaled units) unless ``max_iter`` stops the solver first; gradients are
    ``-D_theta g (D_z g)^-1`` of those conditions (eq. 8, OptNet eq. 7-8) evaluated at the returned
    iterate, w.r.t. ``Q, p, G, h, A, b`` (all cheap: one extra factorisation). With
    ``early_stop="qpth"``, ``z`` equals qpth's ``QPFunction(maxIter=max_iter)`` output (to
    float64 round-off) and so do the gradients.

    Args:
        Q: [B, n, n] or [n, n] symmetric positive semi-definite.
        p: [B, n] or [n].
        G: [B, m, n] or [m, n] inequality matrix (optional, with ``h``).
        h: [B, m] or [m].
        A: [B, k, n] or [k, n] equality matrix (optional, with ``b``).
        b: [B, k] or [k].
        backend: ``"native"`` (default; float64 inside, robust) or ``"qpth"`` (optional
            dependency, runs in the input dtype, needs positive-definite ``Q``; its iterate is
            always qpth's own, whatever ``early_stop`` says).
        max_iter: interior-point iteration cap. ``None``: solve to ``tol`` (at most 100 native
            iterations; qpth's 20). With ``early_stop="native"`` a small cap returns the native
            method's iterate, which is *not* MetaOptNet's early-stopped solution.
        early_stop: ``"native"`` (default) or ``"qpth"``: return qpth's iterate after
            ``max_iter`` iterations (required), computed in float64 by a reproduction of qpth's
            batched PDIPM (same initial point, step rules and best-iterate choice; no qpth
            import), differentiated as qpth does. MetaOptNet's early stopping (§4.1) is this
            with ``max_iter=3`` (test) / ``15`` (training) on ``Q = kron(K, I) + 1.0 I``.
            ``Q`` must be positive definite (as for qpth); ``tol`` is not used (qpth's
            ``eps = 1e-12``); without ``G`` a dummy row ``0 <= 1`` is added, as for the qpth backend.
        tol: stopping tolerance on the scaled KKT residual.
        return_info: also return a :class:`QPInfo` (for qpth this reruns its forward to read
            the multipliers; for ``early_stop="qpth"`` ``iterations`` is the index of the returned
            iterate, ``converged`` qpth's own test ``merit < 1e-12``).

    Returns:
        ``z`` [B, n] in the promoted input dtype (``B = 1`` when nothing is batched), or
        ``(z, info)`` when ``return_info``.

    Raises:
        ValueError: bad shapes, non-finite data, unknown backend or ``early_stop``,
            ``max_iter < 1``, ``tol <= 0``; ``early_stop="qpth"`` without ``max_iter`` or with a
            ``Q`` that is not positive definite.
        RuntimeError: the qpth backend failed (its message is kept), or the qpth-style iterate is
            not finite.
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
    _check_early_stop(early_stop, max_iter)
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
    if early_stop == "qpth" and max_iter is not None:
        return _solve_qpth_style(Qe, pe, Ge, he, Ae, be, G is None, max_iter, out_dtype, return_info)
    it = max_iter if max_iter is not None else _DEFAULT_MAX_ITER
    z, _, _, res, iters, conv = DenseQPFunction.apply(Qe, pe, Ge, he, Ae, be, it, tol)
    if max_iter is None and not bool(conv.all()):
        _warn_not_converged("solve_qp", conv, res, "they may be infeasible or unbounded")
    z = z.to(out_dtype)
    return (z, QPInfo(res, iters, conv)) if return_info else z


def _solve_qpth_style(Q: Tensor, p: Tensor, G: Tensor, h: Tensor, A: Tensor, b: Tensor, no_ineq: bool,
                      max_iter: int, out_dtype: torch.dtype, return_info: bool) -> Tensor | tuple[Tensor, QPInfo]:
    """qpth's ``maxIter``-iterate of a batch of float64 QPs (``early_stop="qpth"`` of :func:`solve_qp`)."""
    B, n = p.shape
    if no_ineq:  # qpth has no inequality-free mode: the qpth backend adds the dummy row 0 <= 1
        G, h = p.new_zeros(B, 1, n), p.new_ones(B, 1)
    _require_positive_definite("Q", 0.5 * (Q + Q.mT), "Add a ridge (MetaOptNet adds 1.0 I) or use the exact solver.")
    z, lam, nu, res, index, merit = DensePDIPMFunction.apply(Q, p, G, h, A, b, max_iter)
    _finite_iterate_or_raise(z)
    z = z.to(out_dtype)
    return (z, QPInfo(res, index, merit < QPTH_EPS)) if return_info else z


def _finite_iterate_or_raise(z: Tensor) -> None:
    if not bool(torch.isfinite(z).all()):
        bad = (~torch.isfinite(z).flatten(1).all(1)).nonzero()[:, 0].tolist()
        raise RuntimeError(
            f"early_stop='qpth': the qpth-style iterate is not finite for batch indices {bad[:10]} "
            "(qpth itself would return the same); the problem is badly scaled or degenerate: rescale it "
            "or use the exact solver (early_stop='native', max_iter=None)"
        )


def _warn_not_converged(where: str, conv: Tensor, res: Tensor, why: str) -> None:
    bad = (~conv).nonzero()[:, 0].tolist()
    warnings.warn(
        f"{where}: {len(bad)} problem(s) did not converge (batch indices {bad[:10]}, KKT residual up to "
        f"{float(res[~conv].max()):.3g}); {why}",
        stacklevel=3,
    )


def _expand(t: Tensor, B: int, core_dims: int) -> Tensor:
    return t.expand(B, *t.shape) if t.dim() == core_dims else t


def crammer_singer_qp(gram: Tensor, targets: Tensor, upper: Tensor) -> tuple[Tensor, ...]:
    """The problem of :func:`solve_crammer_singer_dual` as a generic QP for :func:`solve_qp` or qpth.

    ``Q = kron(K, I_m)``, ``p = -vec(targets)``, ``G = I``, ``h = vec(upper)``,
    ``A = kron(I_n, 1_m^T)``, ``b = 0``, variables in sample-major order ``i * m + k`` (as
    MetaOptNet's code builds its SVM dual, eq. 10). MetaOptNet's own matrix
    ``kron(K, I) + 1.0 I`` is ``crammer_singer_qp(K + I, Y, C Y)``.

    Args:
        gram: [B, n, n]; targets: [B, n, m]; upper: [B, n, m].

    Returns:
        ``(Q [B, nm, nm], p [B, nm], G [nm, nm], h [B, nm], A [n, nm], b [n])`` (``G, A, b``
        shared by the batch), in the dtype and on the device of ``gram``.
    """
    B, n, m = targets.shape
    kw = {"dtype": gram.dtype, "device": gram.device}
    Q = (gram[:, :, None, :, None] * torch.eye(m, **kw)[None, None, :, None, :]).reshape(B, n * m, n * m)
    A = torch.kron(torch.eye(n, **kw), torch.ones(1, m, **kw))
    return Q, -targets.reshape(B, n * m), torch.eye(n * m, **kw), upper.reshape(B, n * m), A, gram.new_zeros(n)


def solve_crammer_singer_dual(
    gram: Tensor,
    targets: Tensor,
    upper: Tensor,
    *,
    max_iter: int | None = None,
    early_stop: EarlyStop = "native",
    tol: float = 1e-9,
    return_info: bool = False,
) -> Tensor | tuple[Tensor, QPInfo]:
    """Solve the Crammer-Singer-structured dual QP exactly and differentiate it implicitly.

    Problem (per batch entry; ``alpha`` is ``[n, m]``)::

        min  1/2 sum_k alpha[:, k]^T K alpha[:, k] - <targets, alpha>
        s.t. alpha <= upper,   sum_k alpha[i, k] = 0  (every example i)

    With ``targets = Y`` (one-hot) and ``upper = C Y`` this is MetaOptNet's SVM dual (eq. 10,
    Lee et al. 2019; Crammer & Singer 2001); the primal weights are ``W = alpha^T X`` (eq. 9).
    Equivalent to :func:`solve_qp` on :func:`crammer_singer_qp` (``Q = kron(K, I_m)``,
    ``p = -vec(targets)``, ``G = I``, ``h = vec(upper)``, ``A = kron(I_n, 1_m^T)``, ``b = 0``),
    but each linear system costs ``m`` factorisations of ``n x n`` blocks instead of one of ``nm x nm``.

    Invariant: with ``max_iter=None`` the result is a KKT point to round-off (active-set method,
    interior-point fallback), and gradients w.r.t. ``gram``, ``targets`` and ``upper`` are the
    implicit derivative on the final active set (exact under strict complementarity). With
    ``early_stop="qpth"`` it is qpth's ``maxIter=max_iter`` output on the equivalent generic QP
    (to float64 round-off), with qpth's gradients; MetaOptNet's early stopping is this with
    ``gram = K + 1.0 I`` (its ``kron(K, I) + 1.0 I``) and ``max_iter`` 15 (training) / 3 (test).

    Args:
        gram: [B, n, n] PSD Gram matrix ``K = X X^T`` (add ``rho I`` for a dual ridge).
        targets: [B, n, m] linear term (one-hot labels for the SVM).
        upper: [B, n, m] upper bounds; every row must have a positive sum.
        max_iter: ``None`` (default): exact solve. An integer with ``early_stop="native"``: at
            most that many iterations of the block interior-point method (a cap; its iterate is
            not MetaOptNet's). With ``early_stop="qpth"``: qpth's iteration count (required).
        early_stop: ``"native"`` or ``"qpth"`` (qpth's batched PDIPM reproduced on the block
            structure, ``m`` factorisations of ``n x n`` per step; ``gram`` must be positive
            definite, as qpth requires; ``tol`` is not used).
        tol: KKT tolerance in scaled units (``mean(diag K) = 1``).
        return_info: also return a :class:`QPInfo` (``early_stop="qpth"``: ``iterations`` is
            the index of the returned iterate, ``converged`` qpth's test ``merit < 1e-12``).

    Returns:
        ``alpha`` [B, n, m] in the dtype of ``gram``, or ``(alpha, info)``.

    Raises:
        ValueError: shapes, non-finite values, a row of ``upper`` with a non-positive sum,
            ``max_iter < 1``, ``tol <= 0``, an unknown ``early_stop``; ``early_stop="qpth"``
            without ``max_iter`` or with a ``gram`` that is not positive definite.
        RuntimeError: the qpth-style iterate is not finite.
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
    _check_early_stop(early_stop, max_iter)
    if early_stop == "qpth" and max_iter is not None:
        K64, P64, U64 = gram.to(WORK_DTYPE), targets.to(WORK_DTYPE), upper.to(WORK_DTYPE)
        _require_positive_definite("gram", 0.5 * (K64 + K64.mT),
                                   "MetaOptNet adds 1.0 I to the Gram matrix (svm_cs_head's dual_ridge=1.0).")
        alpha, lam, nu, index, merit = CSPDIPMFunction.apply(K64, P64, U64, max_iter)
        _finite_iterate_or_raise(alpha)
        out = alpha.to(gram.dtype)
        if not return_info:
            return out
        with torch.no_grad():
            res = _residual(0.5 * (K64 + K64.mT), P64, U64, alpha, lam, nu)
        return out, QPInfo(res, index, merit < QPTH_EPS)
    alpha, _, _, res, iters, conv = CSDualFunction.apply(
        gram.to(WORK_DTYPE), targets.to(WORK_DTYPE), upper.to(WORK_DTYPE), max_iter, tol, return_info
    )
    if max_iter is None and not bool(conv.all()):
        _warn_not_converged("solve_crammer_singer_dual", conv, res,
                            "the Gram matrix is rank-deficient or badly rounded (the best iterate is returned)")
    alpha = alpha.to(gram.dtype)
    return (alpha, QPInfo(res, iters, conv)) if return_info else alpha

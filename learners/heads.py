"""Differentiable convex base learners ("heads") of MetaOptNet and its baselines.

A head maps an episode's support embeddings to a linear classifier by solving a convex problem and
scores the query embeddings with it (Lee et al. 2019, §3.3). Every head has the signature::

    head(query, support, support_labels, n_way, **options) -> logits [B, n_query, n_way]

for ``query [B, n_query, d]``, ``support [B, n_support, d]`` and integer ``support_labels
[B, n_support]`` in ``0..n_way-1``. The convex heads work from Gram matrices: the solver only sees
``K = S S^T [B, n_support, n_support]``, so its cost does not depend on ``d``. The learnable scale
gamma of eq. (12) is *not* applied here (the learner applies it), and neither is label smoothing
(see :func:`smoothed_cross_entropy` for the meta-loss).

Heads: :func:`svm_cs_head` (Crammer-Singer SVM dual, eq. 10), :func:`ridge_head` (ridge dual,
eq. 11), :func:`r2d2_head` (closed-form ridge of Bertinetto et al. 2019), :func:`proto_head`
(Prototypical Networks, Snell et al. 2017) and, as in the MetaOptNet code, :func:`svm_he_head`
and :func:`svm_ww_head`. Every head starts with the same prologue, :func:`_episode`: it validates
the episode and the regularisation options and returns an :class:`_Episode` holding the one-hot
labels, the Gram matrix and the scoring rule.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from bilevel.qp import EarlyStop, crammer_singer_qp, solve_crammer_singer_dual, solve_qp

__all__ = [
    "METAOPTNET_DUAL_RIDGE",
    "proto_head",
    "r2d2_head",
    "ridge_head",
    "smooth_labels",
    "smoothed_cross_entropy",
    "svm_cs_head",
    "svm_he_head",
    "svm_ww_head",
]

#: MetaOptNet's code adds ``1.0 * I`` to ``kron(K, I)`` "to avoid PSD errors" from qpth.
METAOPTNET_DUAL_RIDGE = 1.0


# ----------------------------------------------------------------------------- shared prologue


class _Gram(torch.autograd.Function):
    """``K = S S^T`` whose backward is one product, ``dS = (dK + dK^T) S`` (autograd uses two)."""

    @staticmethod
    def forward(ctx, S: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(S)
        return S @ S.mT

    @staticmethod
    def backward(ctx, dK: Tensor) -> Tensor:  # type: ignore[override]
        (S,) = ctx.saved_tensors
        return (dK + dK.mT) @ S


@dataclass(frozen=True)
class _Episode:
    """A validated episode: ``query [B, nq, d]``, ``support [B, n, d]``, ``onehot [B, n, n_way]``."""

    query: Tensor
    support: Tensor
    onehot: Tensor

    def gram(self, ridge: float = 0.0) -> Tensor:
        """``K = S S^T + ridge I`` [B, n, n] (one-product backward)."""
        K = _Gram.apply(self.support)
        if ridge:
            K = K + ridge * torch.eye(K.shape[-1], dtype=K.dtype, device=K.device)
        return K

    def score(self, coef: Tensor) -> Tensor:
        """``logits[b, q, k] = sum_n coef[b, n, k] <support[b, n], query[b, q]>`` (eq. 9 then eq. 12).

        Computed as ``query @ (coef^T support)^T`` (primal weights) or ``(query support^T) @ coef``
        (query Gram), whichever needs fewer flops.
        """
        query, support = self.query, self.support
        nq, n, d = query.shape[1], support.shape[1], support.shape[2]
        k = coef.shape[-1]
        coef = coef.to(support.dtype)
        if (n + nq) * k * d <= nq * n * (d + k):
            return query @ (coef.mT @ support).mT
        return (query @ support.mT) @ coef


def _positive(name: str, value: float | Tensor) -> None:
    v = value.detach() if isinstance(value, Tensor) else torch.as_tensor(value)
    if v.numel() != 1 or not bool(torch.isfinite(v)) or not float(v) > 0:
        raise ValueError(f"{name} must be a finite scalar > 0, got {value!r}")


def _one_of(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be " + ", ".join(repr(a) for a in allowed[:-1])
                         + f" or {allowed[-1]!r}, got {value!r}")


def _n_way_or_raise(n_way: int) -> None:
    if isinstance(n_way, bool) or not isinstance(n_way, int) or n_way < 2:
        raise ValueError(f"n_way must be an int >= 2, got {n_way!r}")


def _episode(query: Tensor, support: Tensor, support_labels: Tensor, n_way: int,
             **positive: float | Tensor) -> _Episode:
    """The heads' prologue: validate the episode and the options that must be positive scalars.

    Raises ``TypeError``/``ValueError`` naming the offending tensor, shape, class or option.
    """
    for name, t in (("query", query), ("support", support), ("support_labels", support_labels)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if query.dim() != 3 or support.dim() != 3:
        raise ValueError(
            f"query and support must be [B, n, d]; got query {tuple(query.shape)}, support {tuple(support.shape)}"
        )
    if not (query.is_floating_point() and support.is_floating_point()):
        raise TypeError(f"query and support must be floating point, got {query.dtype} and {support.dtype}")
    if query.dtype != support.dtype:
        raise TypeError(f"query ({query.dtype}) and support ({support.dtype}) must have the same dtype")
    if query.shape[0] != support.shape[0]:
        raise ValueError(f"batch sizes differ: query {tuple(query.shape)} vs support {tuple(support.shape)}")
    if query.shape[2] != support.shape[2]:
        raise ValueError(f"feature dims differ: query {tuple(query.shape)} vs support {tuple(support.shape)}")
    if support_labels.shape != support.shape[:2]:
        raise ValueError(
            f"support_labels must be [B, n_support] = {tuple(support.shape[:2])}, got {tuple(support_labels.shape)}"
        )
    if support_labels.is_floating_point() or support_labels.is_complex() or support_labels.dtype == torch.bool:
        raise TypeError(f"support_labels must be an integer tensor, got {support_labels.dtype}")
    _n_way_or_raise(n_way)
    if support.shape[1] == 0:
        raise ValueError("support is empty (n_support = 0)")
    lo, hi = int(support_labels.min()), int(support_labels.max())
    if lo < 0 or hi >= n_way:
        raise ValueError(f"support_labels must lie in 0..{n_way - 1} (n_way={n_way}), found values in [{lo}, {hi}]")
    onehot = F.one_hot(support_labels.long(), n_way)
    counts = onehot.sum(1)  # [B, n_way]
    if bool((counts == 0).any()):
        b, k = (counts == 0).nonzero()[0].tolist()
        raise ValueError(f"class {k} has no support example in episode {b} (every class needs at least one)")
    for name, value in positive.items():
        _positive(name, value)
    return _Episode(query, support, onehot.to(support.dtype))


# ----------------------------------------------------------------------------- heads


def svm_cs_head(
    query: Tensor,
    support: Tensor,
    support_labels: Tensor,
    n_way: int,
    *,
    C: float | Tensor = 0.1,
    max_iter: int | None = None,
    early_stop: EarlyStop = "native",
    tol: float = 1e-9,
    solver: Literal["native", "qp", "qpth"] = "native",
    dual_ridge: float | None = None,
) -> Tensor:
    """Crammer-Singer multi-class SVM head (MetaOptNet's "SVM" base learner).

    Solves the dual (eq. 10 of Lee et al. 2019; Crammer & Singer 2001) per episode::

        min_alpha 1/2 sum_k alpha_k^T (K + dual_ridge I) alpha_k - sum_i alpha[i, y_i]
        s.t.      alpha[i, k] <= C [k = y_i],   sum_k alpha[i, k] = 0

    whose primal weights ``w_k = sum_i alpha[i, k] f(x_i)`` (eq. 9) minimise eq. (4), and returns
    ``logits[q, k] = w_k . f(x_q)``. Gradients are the implicit derivative of the KKT conditions
    (eq. 8). Invariant: by default (exact, ``dual_ridge = 0``) the primal objective of ``W`` equals
    the LinearSVC (crammer_singer, no intercept, same ``C``) optimum; with ``max_iter=k,
    early_stop="qpth"`` the logits are those of MetaOptNet's code with ``maxIter=k`` (qpth on
    ``kron(K, I) + 1.0 I``), to float64 round-off, and so are their gradients.

    Args:
        query: [B, n_query, d]; support: [B, n_support, d]; support_labels: [B, n_support] ints.
        n_way: number of classes (>= 2); every class needs a support example.
        C: SVM cost (> 0; a 0-dim tensor is differentiated through). Paper: 0.1.
        max_iter: ``None`` (default) solves exactly. An integer stops the solver after that
            many iterations; whose iterate is returned is chosen by ``early_stop``.
        early_stop: ``"native"``: the native interior-point method's iterate (a cap; it does
            *not* reproduce MetaOptNet). ``"qpth"``: MetaOptNet's early stopping (§4.1; 15
            iterations at meta-training, 3 at meta-test): qpth's PDIPM iterate after ``max_iter``
            iterations, reproduced in float64 without qpth, with ``dual_ridge`` defaulting to
            MetaOptNet's 1.0. Needs ``max_iter``.
        tol: KKT tolerance of the exact / native solver (unused with ``early_stop="qpth"``).
        solver: ``"native"`` (structured solver, default), ``"qp"`` (generic
            :func:`bilevel.qp.solve_qp` on the ``kron(K, I)`` QP) or ``"qpth"`` (the same QP on
            qpth itself; with ``max_iter`` this needs ``early_stop="qpth"``, whose iterate it is).
        dual_ridge: adds ``dual_ridge * I`` to ``K`` (>= 0). ``None``: 1.0 (MetaOptNet's code) with
            ``early_stop="qpth"`` and ``max_iter`` set, else 0 (the exact eq. 10).

    Returns:
        logits [B, n_query, n_way] in the dtype of ``query``.
    """
    ep = _episode(query, support, support_labels, n_way, C=C)
    _one_of("solver", solver, ("native", "qp", "qpth"))
    _one_of("early_stop", early_stop, ("native", "qpth"))
    if early_stop == "qpth" and max_iter is None:
        raise ValueError("early_stop='qpth' stops qpth's method after max_iter iterations: give max_iter "
                         "(MetaOptNet: 15 at meta-training, 3 at meta-test), or leave early_stop='native' "
                         "with max_iter=None for the exact solution")
    if solver == "qpth" and max_iter is not None and early_stop != "qpth":
        raise ValueError("solver='qpth' with max_iter returns qpth's own iterate: pass early_stop='qpth' "
                         "(the same iterate, without qpth: solver='native')")
    qpth_style = max_iter is not None and early_stop == "qpth"
    ridge = (METAOPTNET_DUAL_RIDGE if qpth_style else 0.0) if dual_ridge is None else dual_ridge
    if not ridge >= 0:
        raise ValueError(f"dual_ridge must be >= 0, got {dual_ridge}")
    K, Y = ep.gram(ridge), ep.onehot
    if solver == "native":
        alpha = solve_crammer_singer_dual(K, Y, C * Y, max_iter=max_iter, early_stop=early_stop, tol=tol)
    else:
        z = solve_qp(*crammer_singer_qp(K, Y, C * Y), backend="native" if solver == "qp" else "qpth",
                     max_iter=max_iter, early_stop=early_stop if solver == "qp" else "native",
                     tol=min(tol, 1e-10) if solver == "qp" else 1e-12)
        alpha = z.reshape(Y.shape)
    return ep.score(alpha)


def _ridge_coef(ep: _Episode, lam: float | Tensor) -> Tensor:
    """``(K + lam I)^-1 Y`` with the ``n x n`` solve in float64 (``K`` may be badly scaled)."""
    K = ep.gram().double()
    eye = torch.eye(K.shape[-1], dtype=K.dtype, device=K.device)
    lam64 = lam.double() if isinstance(lam, Tensor) else lam
    L = torch.linalg.cholesky(0.5 * (K + K.mT) + lam64 * eye)
    return torch.cholesky_solve(ep.onehot.double(), L).to(ep.support.dtype)


def ridge_head(
    query: Tensor,
    support: Tensor,
    support_labels: Tensor,
    n_way: int,
    *,
    lam: float | Tensor = 50.0,
    solver: Literal["cholesky", "native", "qpth"] = "cholesky",
) -> Tensor:
    """Ridge-regression head in the dual (eq. 11 of Lee et al. 2019).

    Solves ``max_alpha -1/2 sum_k |w_k(alpha_k)|^2 - lam/2 sum_k |alpha_k|^2 + sum_i alpha[i, y_i]``,
    i.e. ``alpha = (K + lam I)^-1 Y``, the dual of ``min_W 1/2 sum_i |W f(x_i) - y_i|^2 +
    lam/2 |W|^2``; returns ``logits[q, k] = sum_i alpha[i, k] <f(x_i), f(x_q)>``. (The MetaOptNet
    code uses ``-2 Y`` as linear term, which doubles the logits; the learnable scale absorbs it.)

    Args:
        query, support, support_labels, n_way: the episode (see module docstring).
        lam: ridge parameter (> 0; paper: 50.0). A 0-dim tensor is differentiated through.
        solver: ``"cholesky"`` (closed form, default), ``"native"`` / ``"qpth"`` (the same
            unconstrained QP through :func:`bilevel.qp.solve_qp`, one problem per class).

    Returns:
        logits [B, n_query, n_way].
    """
    ep = _episode(query, support, support_labels, n_way, lam=lam)
    _one_of("solver", solver, ("cholesky", "native", "qpth"))
    if solver == "cholesky":
        alpha = _ridge_coef(ep, lam)
    else:
        B, n, m = ep.onehot.shape
        H = ep.gram() + lam * torch.eye(n, dtype=support.dtype, device=support.device)
        Hm = H[:, None].expand(B, m, n, n).reshape(B * m, n, n)
        z = solve_qp(Hm, -ep.onehot.mT.reshape(B * m, n), backend=solver, tol=1e-12)
        alpha = z.reshape(B, m, n).mT
    return ep.score(alpha)


def r2d2_head(
    query: Tensor,
    support: Tensor,
    support_labels: Tensor,
    n_way: int,
    *,
    lam: float | Tensor = 50.0,
) -> Tensor:
    """Closed-form ridge-regression head of R2D2 (Bertinetto et al. 2019).

    ``W = (S^T S + lam I_d)^-1 S^T Y = S^T (S S^T + lam I_n)^-1 Y`` (Woodbury: an ``n x n``
    solve instead of ``d x d``); returns ``logits = query @ W``. Equal to :func:`ridge_head`
    (invariant checked by the tests); R2D2's learnable scale and bias are left to the learner.

    Args:
        query, support, support_labels, n_way: the episode (see module docstring).
        lam: ridge parameter (> 0; 50.0 as in MetaOptNet's R2D2 head).

    Returns:
        logits [B, n_query, n_way].
    """
    ep = _episode(query, support, support_labels, n_way, lam=lam)
    W = support.mT @ _ridge_coef(ep, lam)  # [B, d, n_way]
    return query @ W


def proto_head(
    query: Tensor,
    support: Tensor,
    support_labels: Tensor,
    n_way: int,
    *,
    normalize: bool = True,
) -> Tensor:
    """Prototypical-network head (Snell et al. 2017) as in the MetaOptNet code.

    ``logits[q, k] = -|f(x_q) - c_k|^2 / d`` with ``c_k`` the mean support embedding of class
    ``k`` (the ``1/d`` normalisation of §4.1 is dropped with ``normalize=False``).

    Args:
        query, support, support_labels, n_way: the episode (see module docstring).
        normalize: divide the squared distances by the embedding dimension ``d``.

    Returns:
        logits [B, n_query, n_way].
    """
    Y = _episode(query, support, support_labels, n_way).onehot
    protos = (Y.mT @ support) / Y.sum(1)[..., None]  # [B, n_way, d]
    sq = torch.linalg.vecdot(query, query)[..., None] - 2 * query @ protos.mT
    logits = -(sq + torch.linalg.vecdot(protos, protos)[:, None, :])
    return logits / query.shape[-1] if normalize else logits


def _box_qp(Q: Tensor, C: float | Tensor, solver: str, max_iter: int | None) -> Tensor:
    """``argmin 1/2 z'Qz - sum z`` s.t. ``0 <= z <= C`` (the binary-SVM-type duals of He and WW)."""
    _one_of("solver", solver, ("native", "qpth"))
    nv = Q.shape[-1]
    eye = torch.eye(nv, dtype=Q.dtype, device=Q.device)
    h = torch.cat([C * torch.ones(nv, dtype=Q.dtype, device=Q.device), Q.new_zeros(nv)], 0)
    return solve_qp(Q, -Q.new_ones(nv), torch.cat([eye, -eye], 0), h, backend=solver, max_iter=max_iter)


def svm_he_head(
    query: Tensor,
    support: Tensor,
    support_labels: Tensor,
    n_way: int,
    *,
    C: float | Tensor = 0.01,
    max_iter: int | None = None,
    solver: Literal["native", "qpth"] = "native",
) -> Tensor:
    """Simplified multi-class SVM head with simplex label codes (He et al. 2012; MetaOptNet code).

    Labels are coded as ``v_y = (n_way e_y - 1) / (n_way - 1)``; the dual has one variable per
    example: ``max sum_i a_i - 1/2 sum_ij a_i a_j <v_i, v_j> K_ij`` s.t. ``0 <= a <= C``, and the
    class scores are ``W f(x_q)`` with ``W = sum_i a_i v_i f(x_i)^T`` (the MetaOptNet code sums
    ``a_i K(x_i, x_q)`` per class instead; the two differ by a per-query shift and a scale).

    Args:
        query, support, support_labels, n_way: the episode (see module docstring).
        C: SVM cost (> 0; MetaOptNet's default 0.01).
        max_iter: interior-point iteration cap of :func:`bilevel.qp.solve_qp` (``None``: converge).
        solver: backend of :func:`bilevel.qp.solve_qp`.

    Returns:
        logits [B, n_query, n_way].
    """
    ep = _episode(query, support, support_labels, n_way, C=C)
    m = n_way
    V = (m * ep.onehot - 1) / (m - 1)
    a = _box_qp(ep.gram() * (V @ V.mT), C, solver, max_iter)
    return ep.score(a[..., None] * V)


def svm_ww_head(
    query: Tensor,
    support: Tensor,
    support_labels: Tensor,
    n_way: int,
    *,
    C: float | Tensor = 0.1,
    max_iter: int | None = None,
    solver: Literal["native", "qpth"] = "native",
) -> Tensor:
    """Weston-Watkins multi-class SVM head (Weston & Watkins 1999; MetaOptNet code, "SVM-WW").

    Primal: ``min 1/2 sum_k |w_k|^2 + C sum_i sum_{k != y_i} xi_ik`` s.t.
    ``(w_{y_i} - w_k) . f(x_i) >= 1 - xi_ik``, ``xi >= 0``. Dual over ``beta_ik`` (``k != y_i``),
    ``0 <= beta <= C``: ``max sum beta - 1/2 sum_k |w_k|^2`` with ``w_k = sum_i alpha_ik f(x_i)``
    and ``alpha_ik = [k = y_i] sum_j beta_ij - beta_ik``.

    Args:
        query, support, support_labels, n_way: the episode (see module docstring).
        C: SVM cost (> 0).
        max_iter: interior-point iteration cap of :func:`bilevel.qp.solve_qp` (``None``: converge).
        solver: backend of :func:`bilevel.qp.solve_qp`.

    Returns:
        logits [B, n_query, n_way].
    """
    ep = _episode(query, support, support_labels, n_way, C=C)
    Y = ep.onehot
    B, n, m = Y.shape
    # alpha_i = T_i beta_i with T_i = y_i 1^T - I, restricted to the n (m - 1) variables k != y_i
    T = Y[..., :, None] - torch.eye(m, dtype=Y.dtype, device=Y.device)  # [B, n, m, m]
    keep = (Y.reshape(B, n * m) == 0).nonzero()[:, 1].reshape(B, n * (m - 1))
    Tfull = torch.zeros(B, n * m, n * m, dtype=Y.dtype, device=Y.device)
    for i in range(n):  # block-diagonal assembly (n is small)
        Tfull[:, i * m:(i + 1) * m, i * m:(i + 1) * m] = T[:, i]
    Tr = Tfull.gather(2, keep[:, None, :].expand(B, n * m, n * (m - 1)))  # [B, nm, n(m-1)]
    Q = Tr.mT @ crammer_singer_qp(ep.gram(), Y, Y)[0] @ Tr  # kron(K, I_m) reduced to the k != y_i variables
    beta = _box_qp(Q, C, solver, max_iter)
    alpha = (Tr @ beta[..., None])[..., 0].reshape(B, n, m)
    return ep.score(alpha)


# ----------------------------------------------------------------------------- label smoothing


def smooth_labels(labels: Tensor, n_way: int, eps: float = 0.1) -> Tensor:
    """MetaOptNet's label smoothing: ``1 - eps`` on the true class, ``eps / (n_way - 1)`` elsewhere.

    (PyTorch's ``label_smoothing=e`` instead gives ``e / n_way`` to every class; the two agree for
    ``e = eps * n_way / (n_way - 1)``.)

    Args:
        labels: integer tensor of any shape, values in ``0..n_way-1``.
        n_way: number of classes (>= 2).
        eps: smoothing in ``[0, 1)``; the paper uses 0.1 for miniImageNet + ResNet-12 (§4.1).

    Returns:
        float tensor ``labels.shape + (n_way,)`` whose rows sum to 1.
    """
    if not 0 <= eps < 1:
        raise ValueError(f"eps must be in [0, 1), got {eps}")
    _n_way_or_raise(n_way)
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= n_way):
        raise ValueError(f"labels must lie in 0..{n_way - 1}, found [{int(labels.min())}, {int(labels.max())}]")
    onehot = F.one_hot(labels.long(), n_way).float()
    return onehot * (1 - eps) + (1 - onehot) * (eps / (n_way - 1))


def smoothed_cross_entropy(logits: Tensor, labels: Tensor, eps: float = 0.1) -> Tensor:
    """Mean cross-entropy against :func:`smooth_labels` (MetaOptNet's meta-loss, eq. 12 + §4.1).

    Args:
        logits: [..., n_way] (already multiplied by the learnable scale gamma).
        labels: [...] integer labels.
        eps: label smoothing (0 gives the plain cross-entropy).

    Returns:
        scalar loss ``mean(-sum_k t_k log softmax(logits)_k)``.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} do not match")
    target = smooth_labels(labels, logits.shape[-1], eps).to(logits.dtype)
    return -(target * F.log_softmax(logits, -1)).sum(-1).mean()

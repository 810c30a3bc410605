"""MetaOptNet (Lee et al. 2019): meta-learning with differentiable convex base learners.

The base learner ("head") maps an episode's support embeddings to a linear classifier by solving
a convex problem, and scores the query embeddings with it (§3.3). Every head has the signature::

    head(query, support, support_labels, n_way, **options) -> logits [B, n_query, n_way]

for ``query [B, n_query, d]``, ``support [B, n_support, d]`` and integer ``support_labels
[B, n_support]`` in ``0..n_way-1``. The heads work from Gram matrices: the solver only sees
``K = S S^T [B, n_support, n_support]``, so its cost does not depend on ``d``. The learnable scale
gamma of eq. (12) is *not* applied here (the learner applies it), and neither is label smoothing
(see :func:`smoothed_cross_entropy` for the meta-loss).

Heads: :func:`svm_cs_head` (Crammer-Singer SVM dual, eq. 10), :func:`ridge_head` (ridge dual,
eq. 11), :func:`r2d2_head` (closed-form ridge of Bertinetto et al. 2019), :func:`proto_head`
(Prototypical Networks, Snell et al. 2017) and, as in the MetaOptNet code, :func:`svm_he_head`
and :func:`svm_ww_head`.
"""
from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bilevel.learner import MetaLearner, n_way_of
from bilevel.options import OptionError, option
from bilevel.qp import solve_crammer_singer_dual, solve_qp
from learners.common import BackboneConfig, make_network

__all__ = [
    "HEADS",
    "MetaOptNet",
    "MetaOptNetConfig",
    "proto_head",
    "r2d2_head",
    "ridge_head",
    "smooth_labels",
    "smoothed_cross_entropy",
    "svm_cs_head",
    "svm_he_head",
    "svm_ww_head",
]

# ======================================================================================
# Heads: differentiable convex base learners (the MetaOptNet learner follows them).
# ======================================================================================

Solver = Literal["native", "qp", "qpth"]


def _check_episode(query: Tensor, support: Tensor, support_labels: Tensor, n_way: int) -> Tensor:
    """Validate an episode and return the one-hot support labels ``[B, n_support, n_way]``."""
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
    if isinstance(n_way, bool) or not isinstance(n_way, int) or n_way < 2:
        raise ValueError(f"n_way must be an int >= 2, got {n_way!r}")
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
    return onehot.to(support.dtype)


def _positive(name: str, value: float | Tensor) -> None:
    v = value.detach() if isinstance(value, Tensor) else torch.as_tensor(value)
    if v.numel() != 1 or not bool(torch.isfinite(v)) or not float(v) > 0:
        raise ValueError(f"{name} must be a finite scalar > 0, got {value!r}")


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


def _gram(support: Tensor) -> Tensor:
    return _Gram.apply(support)


def _score(query: Tensor, support: Tensor, coef: Tensor) -> Tensor:
    """``logits[b, q, k] = sum_n coef[b, n, k] <support[b, n], query[b, q]>`` (eq. 9 then eq. 12).

    Computed as ``query @ (coef^T support)^T`` (primal weights) or ``(query support^T) @ coef``
    (query Gram), whichever needs fewer flops.
    """
    nq, n, d = query.shape[1], support.shape[1], support.shape[2]
    k = coef.shape[-1]
    coef = coef.to(support.dtype)
    if (n + nq) * k * d <= nq * n * (d + k):
        return query @ (coef.mT @ support).mT
    return (query @ support.mT) @ coef


def _kron_eye(K: Tensor, m: int) -> Tensor:
    """``kron(K, I_m)`` for a batch ``K [B, n, n]`` (sample-major variable order ``i * m + k``)."""
    B, n, _ = K.shape
    eye = torch.eye(m, dtype=K.dtype, device=K.device)
    return (K[:, :, None, :, None] * eye[None, None, :, None, :]).reshape(B, n * m, n * m)


def svm_cs_head(
    query: Tensor,
    support: Tensor,
    support_labels: Tensor,
    n_way: int,
    *,
    C: float | Tensor = 0.1,
    max_iter: int | None = None,
    tol: float = 1e-9,
    solver: Solver = "native",
    dual_ridge: float = 0.0,
) -> Tensor:
    """Crammer-Singer multi-class SVM head (MetaOptNet's "SVM" base learner).

    Solves the dual (eq. 10 of Lee et al. 2019; Crammer & Singer 2001) per episode::

        min_alpha 1/2 sum_k alpha_k^T K alpha_k - sum_i alpha[i, y_i]
        s.t.      alpha[i, k] <= C [k = y_i],   sum_k alpha[i, k] = 0

    whose primal weights ``w_k = sum_i alpha[i, k] f(x_i)`` (eq. 9) minimise eq. (4), and returns
    ``logits[q, k] = w_k . f(x_q)``. Gradients are the implicit derivative of the KKT conditions
    (eq. 8). Invariant: the primal objective of ``W`` equals the LinearSVC (crammer_singer,
    no intercept, same ``C``) optimum.

    Args:
        query: [B, n_query, d]; support: [B, n_support, d]; support_labels: [B, n_support] ints.
        n_way: number of classes (>= 2); every class needs a support example.
        C: SVM cost (> 0; a 0-dim tensor is differentiated through). Paper: 0.1.
        max_iter: ``None`` solves exactly. An integer caps interior-point iterations to
            reproduce MetaOptNet's early stopping (§4.1: 15 when training, "just three" at test).
        tol: KKT tolerance of the solver.
        solver: ``"native"`` (structured exact solver, default), ``"qp"`` (generic
            :func:`bilevel.qp.solve_qp` on the ``kron(K, I)`` QP) or ``"qpth"`` (same QP on qpth).
        dual_ridge: adds ``dual_ridge * I`` to ``K`` (MetaOptNet's code adds 1.0 "to avoid PSD
            errors"; 0 = the exact eq. 10).

    Returns:
        logits [B, n_query, n_way] in the dtype of ``query``.
    """
    Y = _check_episode(query, support, support_labels, n_way)
    _positive("C", C)
    if dual_ridge < 0:
        raise ValueError(f"dual_ridge must be >= 0, got {dual_ridge}")
    K = _gram(support)
    if dual_ridge > 0:
        K = K + dual_ridge * torch.eye(K.shape[-1], dtype=K.dtype, device=K.device)
    if solver == "native":
        alpha = solve_crammer_singer_dual(K, Y, C * Y, max_iter=max_iter, tol=tol)
    elif solver in ("qp", "qpth"):
        B, n, m = Y.shape
        eye_nm = torch.eye(n * m, dtype=K.dtype, device=K.device)
        A = torch.kron(torch.eye(n, dtype=K.dtype, device=K.device), torch.ones(1, m, dtype=K.dtype, device=K.device))
        z = solve_qp(_kron_eye(K, m), -Y.reshape(B, n * m), eye_nm, (C * Y).reshape(B, n * m), A, K.new_zeros(n),
                     backend="native" if solver == "qp" else "qpth", max_iter=max_iter,
                     tol=min(tol, 1e-10) if solver == "qp" else 1e-12)
        alpha = z.reshape(B, n, m)
    else:
        raise ValueError(f"solver must be 'native', 'qp' or 'qpth', got {solver!r}")
    return _score(query, support, alpha)


def _ridge_coef(support: Tensor, Y: Tensor, lam: float | Tensor) -> Tensor:
    """``(K + lam I)^-1 Y`` with the ``n x n`` solve in float64 (``K`` may be badly scaled)."""
    K = _gram(support).double()
    eye = torch.eye(K.shape[-1], dtype=K.dtype, device=K.device)
    lam64 = lam.double() if isinstance(lam, Tensor) else lam
    L = torch.linalg.cholesky(0.5 * (K + K.mT) + lam64 * eye)
    return torch.cholesky_solve(Y.double(), L).to(support.dtype)


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
    Y = _check_episode(query, support, support_labels, n_way)
    _positive("lam", lam)
    if solver == "cholesky":
        alpha = _ridge_coef(support, Y, lam)
    elif solver in ("native", "qpth"):
        B, n, m = Y.shape
        K = _gram(support)
        H = K + lam * torch.eye(n, dtype=K.dtype, device=K.device)
        Hm = H[:, None].expand(B, m, n, n).reshape(B * m, n, n)
        z = solve_qp(Hm, -Y.mT.reshape(B * m, n), backend=solver, tol=1e-12)
        alpha = z.reshape(B, m, n).mT
    else:
        raise ValueError(f"solver must be 'cholesky', 'native' or 'qpth', got {solver!r}")
    return _score(query, support, alpha)


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
    Y = _check_episode(query, support, support_labels, n_way)
    _positive("lam", lam)
    W = support.mT @ _ridge_coef(support, Y, lam)  # [B, d, n_way]
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
    Y = _check_episode(query, support, support_labels, n_way)
    protos = (Y.mT @ support) / Y.sum(1)[..., None]  # [B, n_way, d]
    sq = torch.linalg.vecdot(query, query)[..., None] - 2 * query @ protos.mT
    logits = -(sq + torch.linalg.vecdot(protos, protos)[:, None, :])
    return logits / query.shape[-1] if normalize else logits


def _box_qp(Q: Tensor, C: float | Tensor, solver: str, max_iter: int | None) -> Tensor:
    """``argmin 1/2 z'Qz - sum z`` s.t. ``0 <= z <= C`` (the binary-SVM-type duals of He and WW)."""
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
        max_iter: interior-point iteration cap (``None``: converge).
        solver: backend of :func:`bilevel.qp.solve_qp`.

    Returns:
        logits [B, n_query, n_way].
    """
    Y = _check_episode(query, support, support_labels, n_way)
    _positive("C", C)
    B, n, m = Y.shape
    V = (m * Y - 1) / (m - 1)
    Q = _gram(support) * (V @ V.mT)
    a = _box_qp(Q, C, solver, max_iter)
    return _score(query, support, a[..., None] * V)


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
        max_iter: interior-point iteration cap (``None``: converge).
        solver: backend of :func:`bilevel.qp.solve_qp`.

    Returns:
        logits [B, n_query, n_way].
    """
    Y = _check_episode(query, support, support_labels, n_way)
    _positive("C", C)
    B, n, m = Y.shape
    # alpha_i = T_i beta_i with T_i = y_i 1^T - I, restricted to the n (m - 1) variables k != y_i
    T = Y[..., :, None] - torch.eye(m, dtype=Y.dtype, device=Y.device)  # [B, n, m, m]
    keep = (Y.reshape(B, n * m) == 0).nonzero()[:, 1].reshape(B, n * (m - 1))
    Tfull = torch.zeros(B, n * m, n * m, dtype=Y.dtype, device=Y.device)
    for i in range(n):  # block-diagonal assembly (n is small)
        Tfull[:, i * m:(i + 1) * m, i * m:(i + 1) * m] = T[:, i]
    Tr = Tfull.gather(2, keep[:, None, :].expand(B, n * m, n * (m - 1)))  # [B, nm, n(m-1)]
    Q = Tr.mT @ _kron_eye(_gram(support), m) @ Tr
    beta = _box_qp(Q, C, solver, max_iter)
    alpha = (Tr @ beta[..., None])[..., 0].reshape(B, n, m)
    return _score(query, support, alpha)


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
    if isinstance(n_way, bool) or not isinstance(n_way, int) or n_way < 2:
        raise ValueError(f"n_way must be an int >= 2, got {n_way!r}")
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


# ======================================================================================
# End of the heads block.
# ======================================================================================


# ======================================================================================
# The MetaOptNet learner: embedding f_φ + convex head + learnable scale γ (eq. 12).
# ======================================================================================

HEADS = {"svm": svm_cs_head, "ridge": ridge_head, "r2d2": r2d2_head, "proto": proto_head}


@dataclass(frozen=True)
class MetaOptNetConfig(BackboneConfig):
    """MetaOptNet's options (Lee et al. 2019, §4.1 for the paper's values)."""

    head: str = option("svm", help="Convex base learner: svm (Crammer–Singer), ridge, r2d2 or proto.",
                       choices=("svm", "ridge", "r2d2", "proto"))
    C: float = option(0.1, help="SVM regularisation C.", min=0, min_open=True, paper="Lee et al. 2019: 0.1")
    lam: float = option(50.0, help="Ridge/R2D2 regularisation λ.", min=0, min_open=True, paper="Lee et al. 2019: 50")
    label_smoothing: float = option(0.0, help="Label smoothing ε of the meta-loss (1−ε on the label).", min=0, max=1,
                                    max_open=True, paper="Lee et al. 2019: 0.1 (miniImageNet, ResNet-12)")
    max_iter: int | None = option(None, help="SVM solver iterations at training time (default: solve exactly).", min=1)
    eval_max_iter: int | None = option(None, help="SVM solver iterations at test time (default: solve exactly).", min=1,
                                       eval=True)
    scale: float = option(1.0, help="Initial value of the learnable logit scale γ.", min=0, min_open=True)


class MetaOptNet(MetaLearner):
    """MetaOptNet (Lee et al. 2019): differentiable convex heads on a backbone.

    Episodes are classified by a convex base learner on f_φ(x). Invariant: logits =
    γ · head(f_φ(query), f_φ(support), labels) with the head's classifier
    the argmin of a convex problem on the support embeddings (SVM-CS dual, ridge, R2D2) or the
    class means (ProtoNet); the meta-loss is the (label-smoothed) query cross-entropy, eq. (12),
    and its gradient w.r.t. φ and γ flows through the head by implicit differentiation of its
    optimality (KKT) conditions (eq. 5–8). The meta-training shot may exceed the test shot
    (``--train-shots``, §4.1). Options: :class:`MetaOptNetConfig` (``backbone``: ``conv4``
    (default), ``conv4-32``, ``resnet12``, ``resnet12-cifar``).

    Reference: K. Lee, S. Maji, A. Ravichandran, S. Soatto. *Meta-Learning with Differentiable
    Convex Optimization*, CVPR 2019.
    """

    Config = MetaOptNetConfig
    train_defaults = {"optimizer": "sgd", "outer_lr": 0.1, "weight_decay": 5e-4}

    def __init__(self, *, example_shape: Sequence[int], ways: int | None, config: Any = None, **options: Any) -> None:
        super().__init__(example_shape=example_shape, ways=ways, config=config, **options)
        if ways is None:
            raise OptionError("dataset", "MetaOptNet is a classification learner; the sinusoid needs a regression "
                              "learner (e.g. maml)")
        c = self.config
        self.embed = make_network(c.backbone or "conv4", example_shape, ways, c.network_options(), head=False)
        self._episodes_arg = "episodes" in inspect.signature(self.embed.forward).parameters
        self.scale = nn.Parameter(torch.tensor(float(c.scale)))
        self.head = c.head
        self.label_smoothing = c.label_smoothing

    def embed_episodes(self, x: Tensor) -> Tensor:
        """f_φ(x) for B episodes [B, n, C, H, W] -> [B, n, d], BatchNorm statistics per episode.

        On CPU the episodes go through the network one at a time (cache-friendly); elsewhere in
        one pass with ``episodes=B``.
        """
        b, n = x.shape[:2]
        if x.device.type != "cpu" and self._episodes_arg:
            return self.embed(x.reshape(b * n, *x.shape[2:]), episodes=b).reshape(b, n, -1)
        return torch.stack([self.embed(x[j]) for j in range(b)])

    def head_options(self, train: bool) -> dict[str, Any]:
        c = self.config
        if self.head == "svm":
            return {"C": c.C, "max_iter": c.max_iter if train else c.eval_max_iter}
        if self.head in ("ridge", "r2d2"):
            return {"lam": c.lam}
        return {}

    def forward(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, *, train: bool = True) -> Tensor:
        n_way = n_way_of(support_y)
        s = self.embed_episodes(support_x)
        q = self.embed_episodes(query_x)
        logits = HEADS[self.head](q, s, support_y, n_way, **self.head_options(train))
        return self.scale * logits

    def query_loss(self, pred: Tensor, query_y: Tensor) -> Tensor:
        """Per-episode (label-smoothed) cross-entropy of the scaled logits, eq. (12): [B]."""
        if not self.label_smoothing:
            return super().query_loss(pred, query_y)
        target = smooth_labels(query_y, pred.shape[-1], self.label_smoothing).to(pred.dtype)
        return -(target * F.log_softmax(pred, -1)).sum(-1).mean(1)

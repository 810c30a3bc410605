"""Helpers shared by the QP solvers: result record, step lengths, guarded factorisations."""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

#: Internal precision of every native solver (inputs are cast to it, outputs cast back).
WORK_DTYPE = torch.float64
#: Fraction of the distance to the boundary taken by an interior-point step.
STEP_FRACTION = 0.99
#: Bounds applied to the barrier weights ``lam / s`` inside linear systems (scaled units).
WEIGHT_MIN, WEIGHT_MAX = 1e-13, 1e13


class QPInfo(NamedTuple):
    """What a solver reached, one entry per problem of the batch.

    Attributes:
        residual: [B] infinity norm of the KKT map of the original (unscaled) problem,
            ``max(|Qz + p + G^T lam + A^T nu|, |Az - b|, max(Gz - h, 0), |lam * (h - Gz)|)``
            (eq. 7 of MetaOptNet, Lee et al. 2019, plus primal feasibility).
        iterations: [B] iterations used (interior-point iterations, or active-set
            iterations for the exact structured solver; with ``early_stop="qpth"`` the index
            of the iterate returned, 0 being the initial point, as qpth returns its best one).
        converged: [B] whether the stopping tolerance was met.
    """

    residual: Tensor
    iterations: Tensor
    converged: Tensor


def step_to_boundary(v: Tensor, dv: Tensor, dims: tuple[int, ...]) -> Tensor:
    """Largest ``a`` with ``v + a dv >= 0`` (``inf`` when ``dv >= 0``), reduced over ``dims``."""
    ratio = torch.where(dv < 0, -v / dv.clamp(max=-1e-300), torch.full_like(v, float("inf")))
    return ratio.amin(dim=dims)


def cholesky_jittered(H: Tensor, jitter: float, tries: int = 6, *, inplace: bool = False,
                      relative: bool = False) -> Tensor:
    """Upper Cholesky factor ``U`` (``U^T U = H + delta I``) of a batch of symmetric PSD ``[..., n, n]``.

    ``delta`` starts at ``jitter`` (absolute: callers pass matrices of unit scale) and grows 1000x
    for the matrices whose factorisation fails, so singular but PSD matrices (duplicated points,
    all-zero embeddings) never raise. With ``relative=True`` (unscaled problems) the first
    attempt is unregularised (``delta = 0``) and a failure starts at ``jitter`` times the mean
    absolute diagonal of that matrix. Matrices that still fail get the square root of their
    diagonal, which keeps the outputs finite. ``inplace=True`` lets it add ``delta`` to ``H``.
    """
    if not inplace:
        H = H.clone()
    diag = H.diagonal(dim1=-2, dim2=-1)
    if relative:
        first = jitter * diag.abs().mean(-1).clamp_min(torch.finfo(H.dtype).tiny)
        delta = torch.zeros_like(first)
    else:
        delta = torch.full(H.shape[:-2], jitter, dtype=H.dtype, device=H.device)
        first = delta
        diag.add_(delta[..., None])
    U, info = torch.linalg.cholesky_ex(H, upper=True)
    for _ in range(tries):
        bad = info != 0
        if not bool(bad.any()):
            return U
        grow = torch.where(bad, torch.where(delta > 0, delta * 999.0, first), torch.zeros_like(delta))
        diag.add_(grow[..., None])
        delta = delta + grow
        U2, info2 = torch.linalg.cholesky_ex(H, upper=True)
        U = torch.where(bad[..., None, None], U2, U)
        info = torch.where(bad, info2, torch.zeros_like(info))
    if bool((info != 0).any()):
        # Last resort (non-finite or indefinite input slipped through): factor the diagonal.
        bad = (info != 0)[..., None, None]
        U = torch.where(bad, torch.diag_embed(diag.abs().clamp_min(1.0).sqrt()), U)
    return U


def finite_or_raise(name: str, t: Tensor) -> None:
    """Raise :class:`bilevel.NonFiniteError` (a ``ValueError``) naming ``name`` when ``t`` holds NaN or Inf."""
    if not bool(torch.isfinite(t).all()):
        from bilevel._engine import NonFiniteError

        raise NonFiniteError(f"{name} contains non-finite values (NaN or Inf); shape {tuple(t.shape)}")

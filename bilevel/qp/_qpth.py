"""Optional qpth backend (Amos & Kolter 2017), imported lazily."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def _import_qpth() -> Any:
    try:
        import qpth.qp  # noqa: F401
        from qpth.solvers.pdipm import batch as pdipm_b
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError(
            "solve_qp(backend='qpth') needs the optional dependency qpth: "
            "pip install 'bilevel[qpth]' (or use backend='native')"
        ) from e
    return qpth.qp, pdipm_b


def qpth_inputs(G: Tensor | None, h: Tensor | None, A: Tensor | None, b: Tensor | None,
                like: Tensor, n: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """qpth needs at least one inequality and empty tensors for absent equalities."""
    if G is None:
        # a dummy, strictly feasible inequality 0 <= 1 (qpth has no inequality-free mode)
        G = like.new_zeros(1, n)
        h = like.new_ones(1)
    if A is None:
        A, b = like.new_empty(0), like.new_empty(0)
    return G, h, A, b  # type: ignore[return-value]


def solve_qpth(Q: Tensor, p: Tensor, G: Tensor, h: Tensor, A: Tensor, b: Tensor,
               max_iter: int, tol: float) -> Tensor:
    """``qpth.qp.QPFunction`` with this package's argument conventions; errors are re-raised."""
    qp_mod, _ = _import_qpth()
    fn = qp_mod.QPFunction(eps=tol, verbose=-1, maxIter=max_iter)
    try:
        return fn(Q, p, G, h, A, b)
    except RuntimeError as e:
        raise RuntimeError(
            f"qpth backend failed ({e}). qpth needs a positive-definite Q and well-conditioned "
            "KKT systems; backend='native' handles PSD/singular problems"
        ) from e


def qpth_duals(Q: Tensor, p: Tensor, G: Tensor, h: Tensor, A: Tensor, b: Tensor,
               max_iter: int, tol: float) -> tuple[Tensor, Tensor, Tensor]:
    """Rerun qpth's batched PDIPM forward (no autograd) to read its ``(z, lam, nu)``."""
    qp_mod, pdipm_b = _import_qpth()
    from qpth.util import expandParam, extract_nBatch

    with torch.no_grad():
        nb = extract_nBatch(Q, p, G, h, A, b)
        Qe, pe, Ge, he = (expandParam(t, nb, d)[0] for t, d in ((Q, 3), (p, 2), (G, 3), (h, 2)))
        Ae, be = (expandParam(t, nb, d)[0] for t, d in ((A, 3), (b, 2)))
        Q_LU, S_LU, R = pdipm_b.pre_factor_kkt(Qe, Ge, Ae)
        z, nu, lam, _ = pdipm_b.forward(Qe, pe, Ge, he, Ae, be, Q_LU, S_LU, R, tol, -1, 3, max_iter)
    if nu is None or nu.numel() == 0:
        nu = z.new_zeros(z.shape[0], 0)
    return z, lam, nu

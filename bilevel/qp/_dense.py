"""Dense batched primal-dual interior-point QP solver with an implicit (KKT) backward pass.

Problem (one per batch entry)::

    min_z  1/2 z^T Q z + p^T z   s.t.  G z <= h,  A z = b

Forward: Mehrotra predictor-corrector (as in OptNet/qpth, Amos & Kolter 2017), solved in float64
on a copy whose objective is scaled to unit size. The Newton systems are reduced to
``Q + G^T diag(lam/s) G`` (Cholesky with a growing jitter, so singular PSD ``Q`` never fails) and
the Schur complement of the equality constraints. Converged iterates are *polished* (as in OSQP):
the guessed active set's equality-constrained KKT system is solved exactly and kept when feasible,
otherwise the interior-point method continues to a 100x tighter tolerance and polishes again.

Backward: the adjoint of the differentiated KKT conditions (eq. 8 of MetaOptNet; OptNet eq. 7-8):
on the active set for polished solutions (exact derivative), with the barrier weights ``lam / s``
for interior-point iterates (early stopping; the OptNet/qpth convention).
"""
from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ._common import (
    STEP_FRACTION,
    WEIGHT_MAX,
    WEIGHT_MIN,
    cholesky_jittered,
    step_to_boundary,
)

_JITTER = 1e-13


def kkt_residual(
    Q: Tensor, p: Tensor, G: Tensor, h: Tensor, A: Tensor, b: Tensor, z: Tensor, lam: Tensor, nu: Tensor
) -> Tensor:
    """Infinity norm of the KKT map of ``min 1/2 z'Qz + p'z s.t. Gz <= h, Az = b`` at ``(z, lam, nu)``.

    The map is eq. (7) of MetaOptNet (stationarity, complementarity, equality) plus primal
    feasibility ``max(Gz - h, 0)`` and dual feasibility ``max(-lam, 0)``.

    Args:
        Q: [B, n, n]; p: [B, n]; G: [B, m, n]; h: [B, m]; A: [B, k, n]; b: [B, k] (``m``/``k`` may be 0).
        z: [B, n] primal point; lam: [B, m] inequality multipliers; nu: [B, k] equality multipliers.

    Returns:
        [B] residual, in the units of the problem as given (no scaling).
    """
    Gz = (G @ z[..., None])[..., 0]
    rd = (Q @ z[..., None])[..., 0] + p + (G.mT @ lam[..., None])[..., 0] + (A.mT @ nu[..., None])[..., 0]
    parts = [rd.abs().amax(-1)]
    if G.shape[-2] > 0:
        parts += [(Gz - h).clamp_min(0).amax(-1), (lam * (h - Gz)).abs().amax(-1), (-lam).clamp_min(0).amax(-1)]
    if A.shape[-2] > 0:
        parts.append(((A @ z[..., None])[..., 0] - b).abs().amax(-1))
    return torch.stack(parts, -1).amax(-1)


def _objective_scale(Q: Tensor, p: Tensor) -> Tensor:
    sig = torch.maximum(Q.abs().amax((-2, -1)), p.abs().amax(-1))
    return torch.where(sig > 0, sig, torch.ones_like(sig))


class _Reduced:
    """Factorisation of ``H = Q + G^T W G`` and of the Schur complement ``S = A H^-1 A^T``.

    ``relative_jitter``: regularise each factorisation relative to its own scale (for unscaled
    problems, see :func:`cholesky_jittered`) instead of the absolute ``_JITTER``.
    """

    def __init__(self, Q: Tensor, G: Tensor, A: Tensor, w: Tensor, relative_jitter: float | None = None) -> None:
        H = Q + G.mT @ (w[..., None] * G) if G.shape[-2] > 0 else Q
        jit, rel = (_JITTER, False) if relative_jitter is None else (relative_jitter, True)
        self.L = cholesky_jittered(H, jit, relative=rel)
        self.A = A
        if A.shape[-2] > 0:
            self.HinvAt = torch.cholesky_solve(A.mT, self.L, upper=True)
            self.Ls = cholesky_jittered(A @ self.HinvAt, jit, relative=rel)

    def solve(self, g: Tensor, re: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Solve ``H dz + A^T dnu = g``, ``A dz = -re`` for ``(dz, dnu)``; ``re=None`` means 0."""
        Hg = torch.cholesky_solve(g[..., None], self.L, upper=True)
        if self.A.shape[-2] == 0:
            return Hg[..., 0], None
        r = self.A @ Hg
        if re is not None:
            r = r + re[..., None]
        dnu = torch.cholesky_solve(r, self.Ls, upper=True)
        return (Hg - self.HinvAt @ dnu)[..., 0], dnu[..., 0]


def _kkt_direct(Q: Tensor, p: Tensor, A: Tensor, b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Solve the (inequality-free) KKT system; singular systems get a least-squares solution."""
    n, k = Q.shape[-1], A.shape[-2]
    M = torch.cat([torch.cat([Q, A.mT], -1), torch.cat([A, Q.new_zeros(Q.shape[:-2] + (k, k))], -1)], -2)
    rhs = torch.cat([-p, b], -1)[..., None]
    sol, info = torch.linalg.solve_ex(M, rhs)
    bad = (info != 0) | ~torch.isfinite(sol).all(-1).all(-1)
    if bool(bad.any()):
        warnings.warn(
            "solve_qp: the KKT matrix is singular for some problems (no inequality constraints and "
            "a singular Q); returning the minimum-norm least-squares solution for them",
            stacklevel=4,
        )
        sol = torch.where(bad[..., None, None], torch.linalg.pinv(M) @ rhs, sol)
    return sol[..., :n, 0], sol[..., n:, 0], M


def ipm_dense(
    Q: Tensor, p: Tensor, G: Tensor, h: Tensor, A: Tensor, b: Tensor, max_iter: int, tol: float
) -> dict[str, Any]:
    """Run the scaled Mehrotra interior-point method on batched float64 data.

    Returns a dict with ``z`` [B, n], ``lam`` [B, m], ``nu`` [B, k] (unscaled multipliers), ``w``
    [B, m] barrier weights for the backward pass, ``iterations`` [B], ``converged`` [B] and
    ``sigma`` [B] (objective scale). Converged problems are polished (:func:`_polish`).
    """
    B, n = p.shape
    m, k = G.shape[-2], A.shape[-2]
    Q = 0.5 * (Q + Q.mT)
    sig = _objective_scale(Q, p)
    Qs, ps = Q / sig[:, None, None], p / sig[:, None]
    iters = torch.zeros(B, dtype=torch.long, device=p.device)
    if m == 0:
        z, nu, _ = _kkt_direct(Qs, ps, A, b)
        ones = torch.ones(B, dtype=torch.bool, device=p.device)
        return {"z": z, "lam": p.new_zeros(B, 0), "nu": nu * sig[:, None], "w": p.new_zeros(B, 0),
                "active": p.new_zeros(B, 0), "polished": ones, "iterations": iters, "converged": ones,
                "sigma": sig}
    # Initial point (CVXOPT): minimise 1/2 z'Qz + p'z + 1/2 |Gz - h|^2 s.t. Az = b, then shift.
    red = _Reduced(Qs, G, A, torch.ones_like(h))
    z, nu = red.solve(-ps + (G.mT @ h[..., None])[..., 0], -b if k > 0 else None)
    nu = nu if nu is not None else p.new_zeros(B, 0)
    s = h - (G @ z[..., None])[..., 0]
    lam = -s
    s = s + (1.0 - s.amin(-1, keepdim=True)).clamp_min(0)
    lam = lam + (1.0 - lam.amin(-1, keepdim=True)).clamp_min(0)
    pscale = 1.0 + torch.maximum(h.abs().amax(-1), b.abs().amax(-1) if k > 0 else h.new_zeros(B))
    conv = torch.zeros(B, dtype=torch.bool, device=p.device)  # reached tol
    final = torch.zeros(B, dtype=torch.bool, device=p.device)  # polished, or polishing given up
    polished = torch.zeros(B, dtype=torch.bool, device=p.device)
    act = torch.zeros_like(lam)
    tol_cur = torch.full((B,), tol, dtype=p.dtype, device=p.device)
    z_out, lam_out, nu_out, w_out = z.clone(), lam.clone(), nu.clone(), torch.ones_like(lam)
    for _ in range(max_iter + 1):
        rd = (Qs @ z[..., None])[..., 0] + ps + (G.mT @ lam[..., None])[..., 0]
        if k > 0:
            rd = rd + (A.mT @ nu[..., None])[..., 0]
            re = (A @ z[..., None])[..., 0] - b
        else:
            re = None
        rp = (G @ z[..., None])[..., 0] + s - h
        mu = (s * lam).mean(-1)
        pres = rp.abs().amax(-1) if re is None else torch.maximum(rp.abs().amax(-1), re.abs().amax(-1))
        res = torch.maximum(torch.maximum(pres / pscale, rd.abs().amax(-1)), (s * lam).amax(-1))
        conv = conv | (res <= tol)
        newly = (res <= tol_cur) & ~final
        if bool(newly.any()):
            # polish; where the active set is still ambiguous, iterate to a 100x tighter tolerance
            i = newly.nonzero()[:, 0]
            zp, lp, nup, actp, okp = _polish(Qs[i], ps[i], G[i], h[i], A[i], b[i], z[i], lam[i], nu[i], s[i], tol)
            good, bad = i[okp], i[~okp]
            z_out[good], lam_out[good], act[good] = zp[okp], lp[okp], actp[okp]
            if k > 0:
                nu_out[good] = nup[okp]
            polished[good] = True
            final[good] = True
            tol_cur[bad] = tol_cur[bad] * 1e-2
            give_up = bad[tol_cur[bad] < 1e-15]
            final[give_up] = True
        keep = ~final
        z_out = torch.where(keep[:, None], z, z_out)
        lam_out = torch.where(keep[:, None], lam, lam_out)
        if k > 0:
            nu_out = torch.where(keep[:, None], nu, nu_out)
        w_out = torch.where(polished[:, None], w_out, (lam / s).clamp(WEIGHT_MIN, WEIGHT_MAX))
        if bool(final.all()) or _ == max_iter:
            break
        iters = iters + keep.long()
        red = _Reduced(Qs, G, A, (lam / s).clamp(WEIGHT_MIN, WEIGHT_MAX))

        def direction(rc: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
            g = -rd - (G.mT @ ((rc + lam * rp) / s)[..., None])[..., 0]
            dz, dnu = red.solve(g, re)
            ds = -rp - (G @ dz[..., None])[..., 0]
            return dz, ds, (rc - lam * ds) / s, dnu

        dz, ds, dl, _d = direction(-s * lam)
        a = torch.minimum(step_to_boundary(s, ds, (-1,)), step_to_boundary(lam, dl, (-1,))).clamp(max=1.0)
        mu_aff = ((s + a[:, None] * ds) * (lam + a[:, None] * dl)).mean(-1)
        sigma_c = (mu_aff / mu.clamp_min(1e-300)).clamp(0.0, 1.0) ** 3
        dz, ds, dl, dnu = direction((sigma_c * mu)[:, None] - s * lam - ds * dl)
        a = (STEP_FRACTION * torch.minimum(step_to_boundary(s, ds, (-1,)), step_to_boundary(lam, dl, (-1,))))
        a = torch.where(keep, a.clamp(max=1.0), torch.zeros_like(a))
        z = z + a[:, None] * dz
        s = s + a[:, None] * ds
        lam = lam + a[:, None] * dl
        if dnu is not None:
            nu = nu + a[:, None] * dnu
    return {"z": z_out, "lam": lam_out * sig[:, None], "nu": nu_out * sig[:, None], "w": w_out, "active": act,
            "polished": polished, "iterations": iters, "converged": conv, "sigma": sig}


def _active_kkt(Qs: Tensor, G: Tensor, A: Tensor, act: Tensor) -> Tensor:
    """Symmetric KKT matrix of the equality-constrained QP on the active set ``act`` [B, m].

    ``[[Q, G_A', A'], [G_A, act - 1, 0], [A, 0, 0]]`` with ``G_A = diag(act) G``: inactive
    multipliers are pinned to zero by the ``-1`` diagonal.
    """
    m, k = G.shape[-2], A.shape[-2]
    GA = act[..., None] * G
    top = torch.cat([Qs, GA.mT, A.mT], -1)
    mid = torch.cat([GA, torch.diag_embed(act - 1.0), G.new_zeros(G.shape[:-2] + (m, k))], -1)
    bot = torch.cat([A, A.new_zeros(A.shape[:-2] + (k, m + k))], -1)
    return torch.cat([top, mid, bot], -2)


def _polish(Qs: Tensor, ps: Tensor, G: Tensor, h: Tensor, A: Tensor, b: Tensor, z: Tensor, lam: Tensor,
            nu: Tensor, s: Tensor, tol: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Active-set polishing of converged interior-point iterates (as in OSQP).

    Guesses the active set ``lam > s``, solves the equality-constrained KKT system exactly and
    keeps the result where it is primal and dual feasible. Returns ``z, lam, nu, active, ok``.
    """
    n, m, k = z.shape[-1], G.shape[-2], A.shape[-2]
    act = (lam > s).to(z.dtype)
    M = _active_kkt(Qs, G, A, act)
    rhs = torch.cat([-ps, act * h, b], -1)[..., None]
    sol, info = torch.linalg.solve_ex(M, rhs)
    zp, lp, nup = sol[..., :n, 0], sol[..., n:n + m, 0], sol[..., n + m:, 0]
    resid = (M @ sol - rhs).abs().amax((-2, -1))
    scale = 1.0 + h.abs().amax(-1)
    ok = (info == 0) & torch.isfinite(sol).all(-1).all(-1) & (resid <= tol * scale)
    ok = ok & (((G @ zp[..., None])[..., 0] - h).amax(-1) <= tol * scale) & (lp.amin(-1) >= -tol)
    return zp, lp.clamp_min(0), nup, act, ok


def adjoint_dense(st: dict[str, Tensor], gz: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of ``<gz, z*>`` w.r.t. ``(Q, p, G, h, A, b)`` by the implicit function theorem.

    Polished solutions: solves the symmetric active-set KKT system
    ``[[Q, G_A', A'], [G_A, 0, 0], [A, 0, 0]] [dz; dlam; dnu] = [-gz; 0; 0]`` (exact derivative).
    Interior-point iterates: the reduced system ``[Q + G'WG, A'; A, 0] [dz; dnu] = [-gz; 0]`` with
    ``W = lam / s`` and ``dlam = W G dz`` (OptNet/qpth). Both in the scaled problem; then the
    OptNet formulas ``dQ = sym(dz z'), dp = dz, dG = dlam z' + lam dz', dh = -dlam,
    dA = dnu z' + nu dz', db = -dnu``.
    """
    Q, G, A, z, lam, nu, w, act, pol, sig = (st[k] for k in ("Q", "G", "A", "z", "lam", "nu", "w", "active",
                                                              "polished", "sigma"))
    n, m, k = z.shape[-1], G.shape[-2], A.shape[-2]
    Qs = Q / sig[:, None, None]
    lam_s, nu_s = lam / sig[:, None], nu / sig[:, None]
    dz, dlt, dnu = torch.zeros_like(z), torch.zeros_like(lam), torch.zeros_like(nu)
    if m == 0:
        pol = torch.ones_like(pol)
    exact = pol.nonzero()[:, 0]
    if exact.numel() > 0:
        M = _active_kkt(Qs[exact], G[exact], A[exact], act[exact])
        rhs = torch.cat([-gz[exact], gz.new_zeros(exact.numel(), m + k)], -1)[..., None]
        sol, info = torch.linalg.solve_ex(M, rhs)
        bad = (info != 0) | ~torch.isfinite(sol).all(-1).all(-1)
        if bool(bad.any()):
            sol = torch.where(bad[..., None, None], torch.linalg.pinv(M) @ rhs, sol)
        dz[exact], dlt[exact], dnu[exact] = sol[..., :n, 0], sol[..., n:n + m, 0], sol[..., n + m:, 0]
    barrier = (~pol).nonzero()[:, 0]
    if barrier.numel() > 0:
        red = _Reduced(Qs[barrier], G[barrier], A[barrier], w[barrier])
        dzb, dnub = red.solve(-gz[barrier], None)
        dz[barrier] = dzb
        dlt[barrier] = w[barrier] * (G[barrier] @ dzb[..., None])[..., 0]
        if dnub is not None:
            dnu[barrier] = dnub
    gQ = 0.5 * (dz[..., :, None] * z[..., None, :] + z[..., :, None] * dz[..., None, :]) / sig[:, None, None]
    gp = dz / sig[:, None]
    gG = dlt[..., :, None] * z[..., None, :] + lam_s[..., :, None] * dz[..., None, :]
    gh = -dlt
    gA = dnu[..., :, None] * z[..., None, :] + nu_s[..., :, None] * dz[..., None, :]
    gb = -dnu
    return gQ, gp, gG, gh, gA, gb


class DenseQPFunction(torch.autograd.Function):
    """Autograd wrapper: ``(Q, p, G, h, A, b) -> (z, lam, nu, residual, iterations, converged)``."""

    @staticmethod
    def forward(ctx: Any, Q: Tensor, p: Tensor, G: Tensor, h: Tensor, A: Tensor, b: Tensor,
                max_iter: int, tol: float) -> tuple[Tensor, ...]:
        out = ipm_dense(Q, p, G, h, A, b, max_iter, tol)
        res = kkt_residual(Q, p, G, h, A, b, out["z"], out["lam"], out["nu"])
        ctx.state = {"Q": 0.5 * (Q + Q.mT), "G": G, "A": A, **{k: out[k] for k in ("z", "lam", "nu", "w", "active",
                                                                       "polished", "sigma")}}
        ctx.mark_non_differentiable(out["lam"], out["nu"], res, out["iterations"], out["converged"])
        return out["z"], out["lam"], out["nu"], res, out["iterations"], out["converged"]

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, gz: Tensor, *unused: Any) -> tuple[Tensor | None, ...]:
        grads = adjoint_dense(ctx.state, gz)
        return (*grads, None, None)

"""Structured solver for the Crammer-Singer-type dual QP, with an exact implicit backward pass.

Problem (one per batch entry; ``alpha`` is ``[n, m]``: ``n`` examples, ``m`` classes)::

    min_alpha  1/2 sum_k alpha_k^T K alpha_k - <P, alpha>
    s.t.       alpha <= U (elementwise),   sum_k alpha[i, k] = 0  for every example i

This is eq. (10) of MetaOptNet (Lee et al. 2019) with ``P = Y`` (one-hot labels) and
``U = C Y``: each row ``alpha_i = C e_{y_i} - beta_i`` with ``beta_i`` on the simplex scaled by C.
The Hessian is ``kron(K, I_m)``: in class-major order it is block-diagonal with one ``K`` per class,
so every linear system costs ``m`` factorisations of ``n x n`` matrices plus one ``n x n`` Schur
complement for the equality constraints, instead of one factorisation of an ``nm x nm`` matrix.

Forward (float64, on a copy scaled so that ``mean(diag K) = 1``):
  1. Primal-dual active-set method (Hintermueller, Ito & Kunisch 2002), started from "no bound
     active" (its first system shares one factorisation ``(K + eps I)^-1`` across classes; later
     systems reuse it by Woodbury when ``K`` is well conditioned). When the active set repeats,
     the iterate satisfies the KKT conditions exactly; one step of iterative refinement removes
     the ``eps`` bias and the KKT conditions are checked.
  2. Problems where that fails (rank-deficient ``K`` with many ties, cycling) fall back to a
     Mehrotra interior-point method on the same block structure, which never fails on PSD ``K``.
  With ``max_iter`` given, only the interior-point method runs, for at most ``max_iter``
  iterations (a cap: its early iterates are not qpth's, so this does not reproduce MetaOptNet's
  early stopping; ``early_stop="qpth"`` of ``solve_crammer_singer_dual`` does, see ``_qpth_pdipm``).

Backward: implicit differentiation of the KKT conditions (MetaOptNet eq. 8) on the final system:
the active set for the exact solver (exact derivative where strict complementarity holds), the
barrier weights ``lam / s`` for interior-point iterates (the OptNet/qpth convention).
"""
from __future__ import annotations

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

#: Tikhonov term on free variables of the active-set systems (scaled units, diag(K) ~ 1).
_EPS_FREE = 1e-12
#: Initial Cholesky jitter (absolute, scaled units).
_JITTER = 1e-13
#: Maximum number of active-set iterations before falling back to the interior-point method.
_ACTIVE_SET_MAX_ITER = 15
#: Interior-point iteration cap of the fallback, and iterations without progress before it stops.
_IPM_MAX_ITER = 100
_IPM_STALL = 10
#: Largest estimated condition number of K for the Woodbury path of the active-set method.
_WOODBURY_MAX_COND = 1e8
#: Largest fraction of fixed entries per class for the Woodbury path (else direct factorisation).
_WOODBURY_MAX_FIXED = 0.6


def _mv(M: Tensor, v: Tensor) -> Tensor:
    """Batched matrix-vector product ``M @ v`` for ``M [..., n, n]`` and ``v [..., n]``."""
    return (M @ v[..., None])[..., 0]


class _Direct:
    """Explicit factorisation of the class-separable system (class-major vectors ``[B, m, n]``).

    For class ``k`` with free mask ``f_k`` (1 free, 0 fixed) and weights ``w_k`` on free entries
    (``relative_jitter``: regularise relative to each matrix's scale, for unscaled problems)::

        H_k = F_k K F_k + diag(f_k w_k + (1 - f_k)),    S = sum_k H_k^-1 F_k

    ``solve(r, re)`` returns ``x, nu`` with ``H_k x_k + f_k * nu = r_k`` and ``sum_k x_k = re``.
    With ``f = None`` every entry is free and ``w`` is a scalar: one factorisation shared by classes.
    Cost: ``m`` Cholesky factorisations and inverses of ``n x n`` matrices.
    """

    def __init__(self, K: Tensor, m: int, f: Tensor | None, w: Tensor | float,
                 relative_jitter: float | None = None) -> None:
        jit, rel = (_JITTER, False) if relative_jitter is None else (relative_jitter, True)
        if f is None:
            if not isinstance(w, float):
                raise TypeError("a shared factorisation needs a scalar weight")
            H = K.clone()
            H.diagonal(dim1=-2, dim2=-1).add_(w)
            self.Hinv = torch.cholesky_inverse(cholesky_jittered(H, jit, inplace=True, relative=rel),
                                               upper=True)[:, None]
            S = m * self.Hinv[:, 0]
        else:
            H = K[:, None].expand(-1, m, -1, -1).clone()
            H.mul_(f[..., :, None]).mul_(f[..., None, :])
            H.diagonal(dim1=-2, dim2=-1).add_(f * w + (1 - f))
            self.Hinv = torch.cholesky_inverse(cholesky_jittered(H, jit, inplace=True, relative=rel), upper=True)
            # H_k^-1 F_k = H_k^-1 minus its (diagonal) fixed block
            S = self.Hinv.sum(1)
            S.diagonal(dim1=-2, dim2=-1).sub_(((1 - f) * self.Hinv.diagonal(dim1=-2, dim2=-1)).sum(1))
        self.f = f
        self.Ls = cholesky_jittered(S, jit, inplace=True, relative=rel)

    def select(self, keep: Tensor) -> "_Direct":
        out = _Direct.__new__(_Direct)
        out.Hinv, out.Ls = self.Hinv[keep], self.Ls[keep]
        out.f = None if self.f is None else self.f[keep]
        return out

    def solve(self, r: Tensor, re: Tensor | None) -> tuple[Tensor, Tensor]:
        t = _mv(self.Hinv, r)  # [B, m, n]
        rhs = t.sum(1) if re is None else t.sum(1) - re
        nu = torch.cholesky_solve(rhs[..., None], self.Ls, upper=True)[..., 0]  # [B, n]
        corr = _mv(self.Hinv, nu[:, None, :] if self.f is None else self.f * nu[:, None, :])
        return t - corr, nu


class _Woodbury:
    """The active-set system of :class:`_Direct`, from one shared inverse ``Pm = (K + eps I)^-1``.

    The inverse of the free block of ``K`` is a Schur complement of ``Pm`` (Woodbury)::

        Z_k = Pm - Pm[:, A] Pm[A, A]^-1 Pm[A, :] = F_k K_FF^-1 F_k    (A: fixed entries of class k)

    so each class only needs a factorisation of its ``|A| x |A|`` block (padded to the largest
    in the batch) and ``S = sum_k Z_k = m Pm - V V^T`` is one matrix product. Used when ``K`` is
    well conditioned; cost ``O(m (n a^2 + a^3) + m n^2 a)`` with ``a`` fixed entries per class.
    """

    def __init__(self, Pm: Tensor, f: Tensor, H: Tensor | None = None) -> None:
        B, m, n = f.shape
        self.Pm, self.f, self.H = Pm, f, None
        fixed = f == 0
        counts = fixed.sum(-1)  # [B, m]
        a = int(counts.max()) if counts.numel() else 0
        if a == 0:
            self.V = None
            if H is not None:  # S = m Pm = m H^-1: no factorisation needed
                self.H, self.Ls = H, None
                return
            S = m * Pm
        else:
            idx = torch.argsort(fixed.to(torch.int8), dim=-1, descending=True, stable=True)[..., :a]  # [B, m, a]
            valid = (torch.arange(a, device=f.device) < counts[..., None]).to(Pm.dtype)  # [B, m, a]
            T = torch.gather(Pm[:, None].expand(B, m, n, n), 3, idx[:, :, None, :].expand(B, m, n, a))
            T = T * valid[:, :, None, :]
            Cm = torch.gather(T, 2, idx[..., :, None].expand(B, m, a, a)) * valid[..., :, None]
            Cm.diagonal(dim1=-2, dim2=-1).add_(1 - valid)
            R = cholesky_jittered(Cm, _JITTER, inplace=True)
            eye = torch.eye(a, dtype=Pm.dtype, device=Pm.device)
            self.V = T @ torch.linalg.solve_triangular(R, eye, upper=True)  # V = T R^-1: V V^T = T C^-1 T^T
            Vh = self.V.permute(0, 2, 1, 3).reshape(B, n, m * a)
            S = m * Pm - Vh @ Vh.mT
        self.Ls = cholesky_jittered(S, _JITTER, inplace=True)

    def select(self, keep: Tensor) -> "_Woodbury":
        out = _Woodbury.__new__(_Woodbury)
        out.Pm, out.f = self.Pm[keep], self.f[keep]
        out.Ls = None if self.Ls is None else self.Ls[keep]
        out.H = None if self.H is None else self.H[keep]
        out.V = None if self.V is None else self.V[keep]
        return out

    def _z(self, r: Tensor) -> Tensor:
        """``Z_k r_k`` for ``r [B, m, n]``."""
        out = r @ self.Pm
        if self.V is not None:
            out = out - _mv(self.V, _mv(self.V.mT, r))
        return out

    def solve(self, r: Tensor, re: Tensor | None) -> tuple[Tensor, Tensor]:
        t = self._z(r) + (1 - self.f) * r
        rhs = t.sum(1) if re is None else t.sum(1) - re
        if self.Ls is None:  # nothing fixed: S^-1 = H / m
            nu = (rhs[:, None, :] @ self.H)[:, 0] / self.f.shape[1]
        else:
            nu = torch.cholesky_solve(rhs[..., None], self.Ls, upper=True)[..., 0]
        return t - self._z(nu[:, None, :].expand_as(r)), nu


def _scale(K: Tensor) -> Tensor:
    kappa = K.diagonal(dim1=-2, dim2=-1).mean(-1)
    return torch.where(kappa > 1e-200, kappa, torch.ones_like(kappa))


def _active_set(Kt: Tensor, P: Tensor, U: Tensor, tol: float) -> dict[str, Any]:
    """Primal-dual active-set iterations; class-major ``P, U [B, m, n]``, scaled ``Kt``.

    The first iteration (nothing fixed) shares one factorisation ``(K + eps I)^-1`` across
    classes; later iterations reuse it through :class:`_Woodbury` when ``K`` is well
    conditioned (estimated from that Cholesky factor), else factorise with :class:`_Direct`.
    """
    B, m, n = P.shape
    dev, dt = P.device, P.dtype
    out_x = torch.zeros_like(P)
    out_lam = torch.zeros_like(P)
    out_nu = P.new_zeros(B, n)
    out_f = torch.ones_like(P)
    iters = torch.zeros(B, dtype=torch.long, device=dev)
    ok = torch.zeros(B, dtype=torch.bool, device=dev)
    groups: list[tuple[Tensor, _Direct | _Woodbury]] = []
    # shared first factorisation
    H0 = Kt.clone()
    H0.diagonal(dim1=-2, dim2=-1).add_(_EPS_FREE)
    U0 = cholesky_jittered(H0, _JITTER, inplace=True)
    Pm = torch.cholesky_inverse(U0, upper=True)
    d0 = U0.diagonal(dim1=-2, dim2=-1)
    well = (d0.amin(-1) ** 2 * _WOODBURY_MAX_COND >= d0.amax(-1) ** 2)
    todo = torch.arange(B, device=dev)
    f = None  # start: nothing fixed
    for _ in range(_ACTIVE_SET_MAX_ITER):
        full = todo.numel() == B
        K_, P_, U_, Pm_ = (Kt, P, U, Pm) if full else (Kt[todo], P[todo], U[todo], Pm[todo])
        if f is None:
            blocks: _Direct | _Woodbury = _Woodbury(Pm, torch.ones_like(P), H0)
            x, nu = blocks.solve(P_, None)
            lam = torch.zeros_like(x)
            fmat = torch.ones_like(x)
        else:
            fmat = f.to(dt)
            fixed = U_ * (1 - fmat)
            rhs = fmat * (P_ - fixed @ K_) + fixed
            # Woodbury pays off while few entries per class are fixed and K is well conditioned
            w_ = (well if full else well[todo]) & ((1 - fmat).sum(-1).amax(-1) <= _WOODBURY_MAX_FIXED * n)
            if bool(w_.all()):
                blocks = _Woodbury(Pm_, fmat)
            elif not bool(w_.any()):
                blocks = _Direct(K_, m, fmat, _EPS_FREE)
            else:  # mixed: factorise the two groups separately
                blocks = _Mixed(w_, _Woodbury(Pm_[w_], fmat[w_]), _Direct(K_[~w_], m, fmat[~w_], _EPS_FREE))
            x, nu = blocks.solve(rhs, None)
            lam = (1 - fmat) * (P_ - x @ K_ - nu[:, None, :])
        score = lam + (x - U_)
        new_f = score <= 0
        # every example keeps at least one free class (sum_k U_ik > 0 makes "all fixed" infeasible)
        none_free = ~new_f.any(1)  # [b, n]
        if bool(none_free.any()):
            pick = torch.nn.functional.one_hot(score.argmin(1), m).mT.bool()  # [b, m, n]
            new_f = new_f | (pick & none_free[:, None, :])
        same = (new_f == (fmat > 0)).flatten(1).all(1)
        iters[todo] += 1
        if bool(same.all()) and full:
            out_x, out_lam, out_nu = _refine(blocks, K_, P_, x, nu, fmat)
            out_f = fmat
            groups.append((todo, blocks))
            ok[:] = True
            break
        if bool(same.any()):
            idx = todo[same]
            blk = blocks.select(same)
            xr, lr, nr = _refine(blk, K_[same], P_[same], x[same], nu[same], fmat[same])
            out_x[idx], out_lam[idx], out_nu[idx], out_f[idx] = xr, lr, nr, fmat[same]
            groups.append((idx, blk))
            ok[idx] = True
        todo, f = todo[~same], new_f[~same]
        if todo.numel() == 0:
            break
    # Check the KKT conditions of the accepted points (catches ill-conditioned solves).
    if bool(ok.any()):
        rd = (out_x @ Kt - P + out_lam + out_nu[:, None, :]) * out_f
        bad = (rd.abs().amax((1, 2)) > tol) | ~torch.isfinite(out_x).all(2).all(1)
        bad = bad | ((out_x - U).amax((1, 2)) > tol * (1 + U.abs().amax((1, 2))))
        bad = bad | (out_lam.amin((1, 2)) < -tol)
        ok = ok & ~bad
    return {"x": out_x, "lam": out_lam, "nu": out_nu, "f": out_f, "groups": groups,
            "iterations": iters, "ok": ok}


def _refine(blocks: Any, K: Tensor, P: Tensor, x: Tensor, nu: Tensor, f: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One step of iterative refinement of an active-set solution (removes the ``eps`` bias).

    Returns refined ``x, lam, nu``; ``lam`` (fixed entries only) from stationarity.
    """
    R = f * (P - x @ K - nu[:, None, :])
    dx, dnu = blocks.solve(R, -x.sum(1))
    x, nu = x + dx, nu + dnu
    return x, (1 - f) * (P - x @ K - nu[:, None, :]), nu


class _Mixed:
    """Two factorisations side by side (rows ``sel`` use ``a``, the others ``b``)."""

    def __init__(self, sel: Tensor, a: _Woodbury, b: _Direct) -> None:
        self.sel, self.a, self.b = sel, a, b

    def select(self, keep: Tensor) -> "_Mixed":
        return _Mixed(self.sel[keep], self.a.select(keep[self.sel]), self.b.select(keep[~self.sel]))

    def solve(self, r: Tensor, re: Tensor | None) -> tuple[Tensor, Tensor]:
        x, nu = torch.empty_like(r), r.new_empty(r.shape[0], r.shape[-1])
        for sel, blk in ((self.sel, self.a), (~self.sel, self.b)):
            if bool(sel.any()):
                x[sel], nu[sel] = blk.solve(r[sel], None if re is None else re[sel])
        return x, nu


def _ipm(Kt: Tensor, P: Tensor, U: Tensor, max_iter: int, tol: float, return_best: bool = False) -> dict[str, Any]:
    """Mehrotra predictor-corrector on the block structure; class-major ``[B, m, n]``.

    Returns the last iterate (early stopping semantics), or with ``return_best`` the
    iterate of smallest KKT residual; stops early where ``_IPM_STALL`` iterations brought no
    progress (degenerate problems whose residual is bounded by round-off).
    """
    B, m, n = P.shape
    dev = P.device
    # Initial point: (K + I) x_k + nu = P_k + U_k, sum_k x_k = 0  ->  x_k = (K + I)^-1 (r_k - mean r).
    r0 = P + U
    init = _Direct(Kt, m, None, 1.0)
    x = _mv(init.Hinv, r0 - r0.mean(1, keepdim=True))
    nu = r0.mean(1)
    s = U - x
    lam = -s
    s = s + (1.0 - s.amin((1, 2), keepdim=True)).clamp_min(0)
    lam = lam + (1.0 - lam.amin((1, 2), keepdim=True)).clamp_min(0)
    iters = torch.zeros(B, dtype=torch.long, device=dev)
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    best = torch.full((B,), float("inf"), dtype=P.dtype, device=dev)
    best_mark = best.clone()
    since_best = torch.zeros(B, dtype=torch.long, device=dev)
    bx, bl, bs, bnu = x, lam, s, nu
    ones = torch.ones_like(P)
    for _ in range(max_iter):
        rd = x @ Kt - P + lam + nu[:, None, :]
        re = x.sum(1)
        rs = x + s - U
        mu = (s * lam).mean((1, 2))
        res = torch.stack([rd.abs().amax((1, 2)), re.abs().amax(1), rs.abs().amax((1, 2)), mu], -1).amax(-1)
        done = done | (res <= tol)
        # keep the best iterate; stop where progress stalled (degenerate problems, round-off)
        better = (res < best) & ~done
        keep = better | (done & (res <= tol) & (best > tol))
        best = torch.where(keep, res, best)
        k3 = keep[:, None, None]
        bx, bl, bs = torch.where(k3, x, bx), torch.where(k3, lam, bl), torch.where(k3, s, bs)
        bnu = torch.where(keep[:, None], nu, bnu)
        since_best = torch.where(res < 0.5 * best_mark, torch.zeros_like(since_best), since_best + 1)
        best_mark = torch.where(res < 0.5 * best_mark, res, best_mark)
        if bool((done | (since_best >= _IPM_STALL)).all()):
            break
        iters = iters + (~done).long()
        w = (lam / s).clamp(WEIGHT_MIN, WEIGHT_MAX)
        blocks = _Direct(Kt, m, ones, w)

        def direction(rc: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
            g = -rd - (rc + lam * rs) / s
            dx, dnu = blocks.solve(g, -re)
            # one step of iterative refinement: the systems are ill-conditioned near the solution
            ddx, ddnu = blocks.solve(g - dx @ Kt - w * dx - dnu[:, None, :], -re - dx.sum(1))
            dx, dnu = dx + ddx, dnu + ddnu
            ds = -rs - dx
            return dx, ds, (rc - lam * ds) / s, dnu

        dx, ds, dl, _ = direction(-s * lam)
        a = torch.minimum(step_to_boundary(s, ds, (1, 2)), step_to_boundary(lam, dl, (1, 2))).clamp(max=1.0)
        a3 = a[:, None, None]
        mu_aff = ((s + a3 * ds) * (lam + a3 * dl)).mean((1, 2))
        sig = (mu_aff / mu.clamp_min(1e-300)).clamp(0.0, 1.0) ** 3
        dx, ds, dl, dnu = direction(sig[:, None, None] * mu[:, None, None] - s * lam - ds * dl)
        a = STEP_FRACTION * torch.minimum(step_to_boundary(s, ds, (1, 2)), step_to_boundary(lam, dl, (1, 2)))
        a = torch.where(done, torch.zeros_like(a), a.clamp(max=1.0))
        a3 = a[:, None, None]
        x, s, lam, nu = x + a3 * dx, s + a3 * ds, lam + a3 * dl, nu + a[:, None] * dnu
    if not return_best:
        return {"x": x, "lam": lam, "nu": nu, "s": s, "iterations": iters, "converged": done}
    return {"x": bx, "lam": bl, "nu": bnu, "s": bs, "iterations": iters, "converged": done}


def solve_cs_forward(K: Tensor, P: Tensor, U: Tensor, max_iter: int | None, tol: float,
                     want_residual: bool = True) -> dict[str, Any]:
    """Solve the structured dual. ``K [B, n, n]``, ``P, U [B, n, m]`` float64 (sample-major).

    Returns a dict with ``alpha`` [B, n, m], ``lam`` [B, n, m], ``nu`` [B, n] (original units),
    ``iterations`` [B], ``converged`` [B] and the data the backward pass needs.
    """
    B, n, m = P.shape
    K = 0.5 * (K + K.mT)  # Gram matrices computed in float32 are not exactly symmetric
    kappa = _scale(K)
    Kt = K / kappa[:, None, None]
    Pc, Uc = P.mT.contiguous(), (U * kappa[:, None, None]).mT.contiguous()  # class-major [B, m, n]
    if max_iter is None:
        sol = _active_set(Kt, Pc, Uc, tol)
        x, lam, nu, f = sol["x"], sol["lam"], sol["nu"], sol["f"]
        iters, conv = sol["iterations"], sol["ok"].clone()
        w_ip = torch.zeros_like(x)
        # factorisations of the accepted active sets, reused by the backward pass
        ok = sol["ok"]
        groups = [(idx[ok[idx]], blk.select(ok[idx])) for idx, blk in sol["groups"] if bool(ok[idx].any())]
        fb = (~ok).nonzero()[:, 0]
        if fb.numel() > 0:
            ip = _ipm(Kt[fb], Pc[fb], Uc[fb], _IPM_MAX_ITER, tol, return_best=True)
            x[fb], lam[fb], nu[fb], f[fb] = ip["x"], ip["lam"], ip["nu"], 1.0
            w_ip[fb] = (ip["lam"] / ip["s"]).clamp(WEIGHT_MIN, WEIGHT_MAX)
            iters[fb] += ip["iterations"]
            conv[fb] = ip["converged"]
    else:
        ip = _ipm(Kt, Pc, Uc, max_iter, tol)
        x, lam, nu = ip["x"], ip["lam"], ip["nu"]
        f = torch.ones_like(x)
        w_ip = (ip["lam"] / ip["s"]).clamp(WEIGHT_MIN, WEIGHT_MAX)
        iters, conv = ip["iterations"], ip["converged"]
        groups = []
    alpha = (x / kappa[:, None, None]).mT
    lam_s, nu_s = lam.mT, nu  # multipliers are scale-free (see module docstring of qp)
    if not (want_residual or not bool(conv.all())):
        res = torch.full((B,), float("nan"), dtype=K.dtype, device=K.device)
    else:
        res = _residual(K, P, U, alpha, lam_s, nu_s)
    return {"alpha": alpha, "lam": lam_s, "nu": nu_s, "residual": res, "iterations": iters,
            "converged": conv, "x": x, "kappa": kappa, "Kt": Kt, "f": f, "w_ip": w_ip,
            "groups": groups}


def _residual(K: Tensor, P: Tensor, U: Tensor, alpha: Tensor, lam_s: Tensor, nu_s: Tensor) -> Tensor:
    """KKT residual of the structured dual in original units (same map as ``kkt_residual``)."""
    rd = K @ alpha - P + lam_s + nu_s[..., None]
    return torch.stack([
        rd.abs().amax((1, 2)),
        alpha.sum(-1).abs().amax(-1),
        (alpha - U).clamp_min(0).amax((1, 2)),
        (lam_s * (U - alpha)).abs().amax((1, 2)),
        (-lam_s).clamp_min(0).amax((1, 2)),
    ], -1).amax(-1)


def solve_cs_adjoint(st: dict[str, Any], g_alpha: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of ``<g_alpha, alpha*>`` w.r.t. ``(K, P, U)`` by implicit differentiation.

    Solves, per problem, the adjoint KKT system of the final iterate (scaled units)::

        (F_k K F_k + W_k) d_k + f_k * d_nu = -F_k g_k,   sum_k d_k = 0

    and returns ``dK = 1/2 (D X^T + X D^T) / kappa``, ``dP = -D`` and ``dU = -kappa * dlam`` with
    ``dlam`` the multiplier sensitivity (``w * d`` for interior-point iterates, the stationarity
    residual on fixed entries for active-set solutions).
    """
    x, kappa, Kt, f, w_ip = st["x"], st["kappa"], st["Kt"], st["f"], st["w_ip"]
    B, m, n = x.shape
    g = g_alpha.mT / kappa[:, None, None]  # class-major, scaled: alpha = x / kappa
    d = torch.empty_like(x)
    dnu = x.new_empty(B, n)
    stored = torch.zeros(B, dtype=torch.bool, device=x.device)
    for sel, blocks in st["groups"]:  # active-set solutions: reuse the forward factorisation
        d[sel], dnu[sel] = blocks.solve(-f[sel] * g[sel], None)
        stored[sel] = True
    sel = (~stored).nonzero()[:, 0]
    if sel.numel() > 0:  # interior-point iterates: factorise with the barrier weights
        blocks = _Direct(Kt[sel], m, f[sel], w_ip[sel])
        d[sel], dnu[sel] = blocks.solve(-f[sel] * g[sel], None)
    # multiplier sensitivities: fixed entries from stationarity, weighted entries from w * d
    dlam = (1 - f) * (-g - d @ Kt - dnu[:, None, :]) + f * w_ip * d
    dK = 0.5 * (d.mT @ x + x.mT @ d) / kappa[:, None, None]
    return dK, -d.mT, -(dlam * kappa[:, None, None]).mT


class CSDualFunction(torch.autograd.Function):
    """Autograd wrapper: ``(K, P, U) -> (alpha, lam, nu, residual, iterations, converged)``."""

    @staticmethod
    def forward(ctx: Any, K: Tensor, P: Tensor, U: Tensor, max_iter: int | None, tol: float,
                want_residual: bool) -> tuple[Tensor, ...]:
        st = solve_cs_forward(K, P, U, max_iter, tol, want_residual)
        ctx.state = {k: st[k] for k in ("x", "kappa", "Kt", "f", "w_ip", "groups")}
        outs = (st["alpha"], st["lam"], st["nu"], st["residual"], st["iterations"], st["converged"])
        ctx.mark_non_differentiable(*outs[1:])
        return outs

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g_alpha: Tensor, *unused: Any) -> tuple[Tensor | None, ...]:
        dK, dP, dU = solve_cs_adjoint(ctx.state, g_alpha)
        return dK, dP, dU, None, None, None

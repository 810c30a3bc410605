"""qpth's batched primal-dual interior-point method, reproduced iterate for iterate in float64.

MetaOptNet (Lee et al. 2019, §4.1 "Early stopping"; its code: 15 iterations at meta-training,
``maxIter=3`` at meta-test) stops qpth's ``QPFunction`` (Amos & Kolter 2017,
``qpth/solvers/pdipm/batch.py``) after a fixed number of iterations. Such an early iterate depends
on the algorithm (initial point, centring, step rules, which iterate is returned), so reproducing
the paper means reproducing qpth's algorithm. This module does, in torch and without qpth, for

    min_x 1/2 x'Qx + p'x   s.t.  Gx + s = h, s >= 0 (multiplier z >= 0),  Ax = b (multiplier y)

* Initial point: the Newton system with ``D = I`` and right-hand side ``(p, 0, -h, -b)``, i.e.
  ``x = argmin 1/2 x'Qx + p'x + 1/2 |Gx - h|^2 s.t. Ax = b``, ``s = h - Gx``, ``z = -s``; then
  ``s`` (and ``z``) is shifted to ``s + 1 - min(s)`` only where ``min(s) < 0``.
* Iteration ``i = 0 .. max_iter-1``: residuals ``rx = Qx + G'z + A'y + p``, ``rz = Gx + s - h``,
  ``ry = Ax - b``, ``mu = |s'z| / m``, merit ``|ry|_2 + |rz|_2 + |rx|_2 + m mu``. The best iterate
  so far (per problem, strict improvement of the merit) is kept. The *whole batch* returns when
  no problem improved for ``not_improved_lim`` consecutive iterations, when every best merit is
  below ``eps`` or when ``min mu > 1e32``. Otherwise a Mehrotra step: affine direction, step
  ``a = min(1, get_step)``, ``sigma = ((s + a ds)'(z + a dz) / s'z)^3`` (not clipped), corrector
  with ``rs = (-sigma mu + ds_aff dz_aff) / s``, step ``min(1, 0.999 get_step)``. ``get_step``
  is qpth's: ``min_j -v_j / dv_j`` over ``dv_j <= 0``, entries with ``dv_j > 0`` counting as
  ``max(1, largest ratio in the batch)`` (a batch-wide value, as in qpth).
* Returned: the best iterate among iterates ``0 .. max_iter-1``. The ``max_iter``-th step is
  computed but never evaluated, so ``max_iter=1`` returns the initial point and MetaOptNet's
  "3 iterations" is the best of the initial point and two steps.

Newton systems ``[[Q, 0, G', A'], [0, D, I, 0], [G, I, 0, 0], [A, 0, 0, 0]] d = -r`` with
``D = diag(z / s)`` are solved by eliminating ``ds, dz``: ``(Q + G'DG) dx + A'dy = -rx + G'(rs - D rz)``,
``A dx = -ry``; dense (:class:`DenseOps`) or, for MetaOptNet's SVM dual, one ``n x n`` block
``K + diag(d_k)`` per class (:class:`CSOps`). In exact arithmetic these are qpth's systems (qpth
eliminates the other way round, through LU factors of ``Q`` and of a Schur complement).

Backward: qpth's ``QPFunction.backward``, the KKT derivative at the returned point as if it were
optimal (OptNet eq. 7-8): ``d = max(z, 1e-8) / max(s, 1e-8)``, ``(Q + G'DG) dx + A'dnu = -g``,
``A dx = 0``, ``dlam = D G dx``; ``dQ = sym(dx x')``, ``dp = dx``, ``dG = dlam x' + z dx'``,
``dh = -dlam``, ``dA = dnu x' + y dx'``, ``db = -dnu``.

Deliberate differences from qpth: everything runs in float64 (qpth runs in the input dtype;
MetaOptNet used float32); the factorisations are Cholesky factorisations regularised only where
they fail (qpth's LU raises on an exactly singular system and then returns its best iterate);
inputs shared by the batch get the sum of the per-problem gradients (qpth returns their mean).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ._cs import _Direct
from ._dense import _Reduced, kkt_residual

#: Where a factorisation fails, the regularisation starts at this multiple of the mean diagonal.
_REL_JITTER = 1e-15
#: qpth's defaults: ``QPFunction(eps=1e-12, notImprovedLim=3)``.
QPTH_EPS = 1e-12
QPTH_NOT_IMPROVED_LIM = 3
#: qpth's clamp of the multipliers and slacks in its backward pass.
_BACKWARD_CLAMP = 1e-8

Solve = Callable[[Tensor, "Tensor | None"], "tuple[Tensor, Tensor | None]"]


class DenseOps:
    """Dense problem data ``Q [B, N, N], G [B, M, N], A [B, E, N]`` (``E`` may be 0)."""

    def __init__(self, Q: Tensor, G: Tensor, A: Tensor) -> None:
        self.Qm, self.Gm, self.Am = Q, G, A

    def Q(self, x: Tensor) -> Tensor:
        return (self.Qm @ x[..., None])[..., 0]

    def G(self, x: Tensor) -> Tensor:
        return (self.Gm @ x[..., None])[..., 0]

    def Gt(self, z: Tensor) -> Tensor:
        return (self.Gm.mT @ z[..., None])[..., 0]

    def A(self, x: Tensor) -> Tensor:
        return (self.Am @ x[..., None])[..., 0]

    def At(self, y: Tensor) -> Tensor:
        return (self.Am.mT @ y[..., None])[..., 0]

    def factor(self, d: Tensor) -> Solve:
        """``solve(g, ry)``: ``(Q + G'DG) dx + A'dy = g``, ``A dx = -ry`` (``ry=None``: 0)."""
        return _Reduced(self.Qm, self.Gm, self.Am, d, relative_jitter=_REL_JITTER).solve


class CSOps:
    """MetaOptNet's SVM dual: ``Q = kron(K, I_m)``, ``G = I``, ``A = kron(I_n, 1_m')``.

    Vectors are sample-major ``[B, n m]`` (index ``i m + k``, MetaOptNet's order); the systems
    are solved per class on ``K + diag(d_k)`` (class-major inside).
    """

    def __init__(self, K: Tensor, m: int) -> None:
        self.K, self.m, self.n = K, m, K.shape[-1]

    def _cm(self, v: Tensor) -> Tensor:
        return v.reshape(v.shape[0], self.n, self.m).mT

    def _sm(self, v: Tensor) -> Tensor:
        return v.mT.reshape(v.shape[0], self.n * self.m)

    def Q(self, x: Tensor) -> Tensor:
        return (self.K @ x.reshape(x.shape[0], self.n, self.m)).reshape(x.shape)

    def G(self, x: Tensor) -> Tensor:
        return x

    Gt = G

    def A(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], self.n, self.m).sum(-1)

    def At(self, y: Tensor) -> Tensor:
        return y[..., None].expand(y.shape[0], self.n, self.m).reshape(y.shape[0], self.n * self.m)

    def factor(self, d: Tensor) -> Solve:
        dc = self._cm(d)
        blocks = _Direct(self.K, self.m, torch.ones_like(dc), dc, relative_jitter=_REL_JITTER)

        def solve(g: Tensor, ry: Tensor | None) -> tuple[Tensor, Tensor | None]:
            x, nu = blocks.solve(self._cm(g), None if ry is None else -ry)
            return self._sm(x), nu

        return solve


Ops = DenseOps | CSOps


def _newton(ops: Ops, solve: Solve, d: Tensor, rx: Tensor, rs: Tensor, rz: Tensor,
            ry: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """qpth's ``solve_kkt``: ``Q dx + G'dz + A'dy = -rx, D ds + dz = -rs, G dx + ds = -rz, A dx = -ry``."""
    dx, dy = solve(-rx + ops.Gt(rs - d * rz), ry)
    ds = -rz - ops.G(dx)
    return dx, ds, -rs - d * ds, dy


def _get_step(v: Tensor, dv: Tensor) -> Tensor:
    """qpth's ``get_step``: ``min_j -v_j / dv_j`` with ``dv_j > 0`` entries set to ``max(1, max ratio)``.

    The maximum runs over the whole batch, and Python's ``max(1.0, nan)`` is 1.0, as in qpth.
    """
    a = -v / dv
    top = a.max()
    fill = torch.where(top > 1.0, top, torch.ones_like(top))
    return torch.where(dv > 0, fill, a).amin(1)


def _shift(v: Tensor) -> Tensor:
    """qpth's initial shift: ``v + 1 - min(v)`` where ``min(v) < 0``, unchanged elsewhere."""
    M = v.amin(1, keepdim=True)
    return torch.where(M < 0, v - (M - 1), v)


def pdipm(ops: Ops, p: Tensor, h: Tensor, b: Tensor, max_iter: int, eps: float = QPTH_EPS,
          not_improved_lim: int = QPTH_NOT_IMPROVED_LIM) -> dict[str, Tensor]:
    """qpth's batched PDIPM forward (see the module docstring) on float64 data.

    Args:
        ops: the problem's ``Q, G, A`` (:class:`DenseOps` or :class:`CSOps`).
        p: [B, N]; h: [B, M]; b: [B, E] (``E`` may be 0).
        max_iter: qpth's ``maxIter`` (>= 1).
        eps, not_improved_lim: qpth's ``eps`` and ``notImprovedLim``.

    Returns:
        dict with the returned (best) iterate ``x`` [B, N], ``z`` [B, M], ``s`` [B, M], ``y`` [B, E],
        ``index`` [B] (which iterate it is: 0 = initial point), ``merit`` [B] (qpth's residual
        measure there) and ``steps`` (iterations the batch ran before returning).
    """
    nineq, neq = h.shape[-1], b.shape[-1]
    ones = torch.ones_like(h)
    x, s, z, y = _newton(ops, ops.factor(ones), ones, p, torch.zeros_like(h), -h, -b if neq > 0 else None)
    s, z = _shift(s), _shift(z)
    if y is None:
        y = b.new_zeros(b.shape)
    best: dict[str, Tensor] = {}
    not_improved = 0
    steps = 0
    for i in range(max_iter):
        rx = ops.Q(x) + ops.Gt(z) + p
        rz = ops.G(x) + s - h
        ry = ops.A(x) - b if neq > 0 else None
        if ry is not None:
            rx = rx + ops.At(y)
        mu = ((s * z).sum(1) / nineq).abs()
        merit = rz.norm(dim=1) + rx.norm(dim=1) + nineq * mu
        if ry is not None:
            merit = merit + ry.norm(dim=1)
        if not best:
            best = {"x": x, "z": z, "s": s, "y": y, "merit": merit, "index": torch.zeros_like(merit, dtype=torch.long)}
        else:
            better = merit < best["merit"]
            not_improved = 0 if bool(better.any()) else not_improved + 1
            b1 = better[:, None]
            best = {"x": torch.where(b1, x, best["x"]), "z": torch.where(b1, z, best["z"]),
                    "s": torch.where(b1, s, best["s"]), "y": torch.where(b1, y, best["y"]),
                    "merit": torch.where(better, merit, best["merit"]),
                    "index": torch.where(better, i, best["index"])}
        if not_improved == not_improved_lim or float(best["merit"].max()) < eps or float(mu.min()) > 1e32:
            break
        steps = i + 1
        d = z / s
        solve = ops.factor(d)
        dx_a, ds_a, dz_a, dy_a = _newton(ops, solve, d, rx, z, rz, ry)
        a = torch.minimum(_get_step(z, dz_a), _get_step(s, ds_a)).clamp(max=1.0)[:, None]
        sig = (((s + a * ds_a) * (z + a * dz_a)).sum(1) / (s * z).sum(1)) ** 3
        rs = (-(mu * sig)[:, None] + ds_a * dz_a) / s
        dx_c, ds_c, dz_c, dy_c = _newton(ops, solve, d, torch.zeros_like(x), rs, torch.zeros_like(s),
                                         None if ry is None else torch.zeros_like(ry))
        dx, ds, dz = dx_a + dx_c, ds_a + ds_c, dz_a + dz_c
        a = (0.999 * torch.minimum(_get_step(z, dz), _get_step(s, ds))).clamp(max=1.0)[:, None]
        x, s, z = x + a * dx, s + a * ds, z + a * dz
        if dy_a is not None and dy_c is not None:
            y = y + a * (dy_a + dy_c)
    best["steps"] = torch.full_like(best["index"], steps)
    return best


def pdipm_adjoint(ops: Ops, z: Tensor, s: Tensor, g: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
    """qpth's backward solve at ``(z, s)`` for the incoming gradient ``g`` [B, N]: ``(dx, dlam, dnu)``."""
    d = z.clamp_min(_BACKWARD_CLAMP) / s.clamp_min(_BACKWARD_CLAMP)
    dx, dnu = ops.factor(d)(-g, None)
    return dx, d * ops.G(dx), dnu


def _sym_outer(u: Tensor, v: Tensor) -> Tensor:
    return 0.5 * (u[..., :, None] * v[..., None, :] + v[..., :, None] * u[..., None, :])


class DensePDIPMFunction(torch.autograd.Function):
    """``(Q, p, G, h, A, b) -> (z, lam, nu, residual, index, merit)`` with qpth's forward and backward."""

    @staticmethod
    def forward(ctx: Any, Q: Tensor, p: Tensor, G: Tensor, h: Tensor, A: Tensor, b: Tensor,
                max_iter: int) -> tuple[Tensor, ...]:
        Q = 0.5 * (Q + Q.mT)
        ops = DenseOps(Q, G, A)
        out = pdipm(ops, p, h, b, max_iter)
        res = kkt_residual(Q, p, G, h, A, b, out["x"], out["z"], out["y"])
        ctx.ops = ops
        ctx.save_for_backward(out["x"], out["z"], out["s"], out["y"])
        ctx.mark_non_differentiable(out["z"], out["y"], res, out["index"], out["merit"])
        return out["x"], out["z"], out["y"], res, out["index"], out["merit"]

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, gx: Tensor, *unused: Any) -> tuple[Tensor | None, ...]:
        x, z, s, y = ctx.saved_tensors
        dx, dlam, dnu = pdipm_adjoint(ctx.ops, z, s, gx)
        gQ = _sym_outer(dx, x)
        gG = dlam[..., :, None] * x[..., None, :] + z[..., :, None] * dx[..., None, :]
        if dnu is None:
            gA, gb = torch.zeros_like(ctx.ops.Am), y.new_zeros(y.shape)
        else:
            gA, gb = dnu[..., :, None] * x[..., None, :] + y[..., :, None] * dx[..., None, :], -dnu
        return gQ, dx, gG, -dlam, gA, gb, None


class CSPDIPMFunction(torch.autograd.Function):
    """``(K, P, U) -> (alpha, lam, nu, index, merit)``: qpth on ``kron(K, I)``, ``p = -vec(P)``, ``h = vec(U)``.

    ``alpha, P, U`` are ``[B, n, m]``; gradients w.r.t. ``K`` are those of qpth w.r.t. its ``Q``
    pulled back through ``Q = kron(K, I)``: ``dK_ij = sum_k dQ[(i,k), (j,k)]``.
    """

    @staticmethod
    def forward(ctx: Any, K: Tensor, P: Tensor, U: Tensor, max_iter: int) -> tuple[Tensor, ...]:
        B, n, m = P.shape
        ops = CSOps(0.5 * (K + K.mT), m)
        out = pdipm(ops, -P.reshape(B, n * m), U.reshape(B, n * m), P.new_zeros(B, n), max_iter)
        ctx.ops = ops
        ctx.save_for_backward(out["x"], out["z"], out["s"])
        alpha, lam = out["x"].reshape(B, n, m), out["z"].reshape(B, n, m)
        ctx.mark_non_differentiable(lam, out["y"], out["index"], out["merit"])
        return alpha, lam, out["y"], out["index"], out["merit"]

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g_alpha: Tensor, *unused: Any) -> tuple[Tensor | None, ...]:
        x, z, s = ctx.saved_tensors
        B, n, m = g_alpha.shape
        dx, dlam, _ = pdipm_adjoint(ctx.ops, z, s, g_alpha.reshape(B, n * m))
        X, dX = x.reshape(B, n, m), dx.reshape(B, n, m)
        gK = 0.5 * (dX @ X.mT + X @ dX.mT)
        return gK, -dX, -dlam.reshape(B, n, m), None

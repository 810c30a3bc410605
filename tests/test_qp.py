"""Tests of the batched differentiable QP layer (bilevel.qp): accuracy, gradients, robustness."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from heads_helpers import one_thread  # noqa: F401  (autouse fixture)
from heads_helpers import max_rel, metaoptnet_qpth, relu_features

from bilevel.qp import QPInfo, crammer_singer_qp, kkt_residual, solve_crammer_singer_dual, solve_qp


def random_qp(gen: torch.Generator, dtype: torch.dtype, B: int = 3, n: int = 6, m: int = 5, k: int = 2,
              rank: int | None = None) -> tuple[torch.Tensor, ...]:
    """A feasible QP with PSD Q (rank ``rank``), some constraints active at the optimum."""
    L = torch.randn(B, n, rank or n, generator=gen, dtype=dtype)
    Q = L @ L.mT + (0.1 * torch.eye(n, dtype=dtype) if rank is None else 0)
    p = torch.randn(B, n, generator=gen, dtype=dtype)
    G = torch.randn(B, m, n, generator=gen, dtype=dtype)
    z0 = torch.randn(B, n, generator=gen, dtype=dtype)
    h = (G @ z0[..., None])[..., 0] + torch.rand(B, m, generator=gen, dtype=dtype)
    A = torch.randn(B, k, n, generator=gen, dtype=dtype)
    b = (A @ z0[..., None])[..., 0]
    return Q, p, G, h, A, b


def cs_episode(gen: torch.Generator, dtype: torch.dtype, B: int, way: int, shot: int, d: int,
               scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    labels = torch.arange(way).repeat(shot).expand(B, way * shot)
    X = scale * torch.randn(B, way * shot, d, generator=gen, dtype=dtype)
    return X, labels, F.one_hot(labels, way).to(dtype)


# ----------------------------------------------------------------------------- generic layer


def test_solution_satisfies_kkt_and_matches_qpth(gen: torch.Generator, f64: torch.dtype) -> None:
    Q, p, G, h, A, b = random_qp(gen, f64)
    z, info = solve_qp(Q, p, G, h, A, b, return_info=True)
    assert isinstance(info, QPInfo)
    assert bool(info.converged.all())
    assert float(info.residual.max()) < 1e-10
    zq = solve_qp(Q, p, G, h, A, b, backend="qpth", tol=1e-14)
    torch.testing.assert_close(z, zq, rtol=1e-6, atol=1e-7)
    # some inequality is active, so the test exercises the constrained case
    assert bool(((G @ z[..., None])[..., 0] - h).abs().amin(-1).lt(1e-8).any())


def test_gradcheck_all_inputs(gen: torch.Generator, f64: torch.dtype) -> None:
    Q, p, G, h, A, b = (t.requires_grad_() for t in random_qp(gen, f64, B=1, n=4, m=4, k=1))

    def f(Q, p, G, h, A, b):
        return solve_qp(0.5 * (Q + Q.mT), p, G, h, A, b, tol=1e-12)

    assert torch.autograd.gradcheck(f, (Q, p, G, h, A, b), eps=1e-6, atol=1e-6, rtol=1e-4)
    # a larger batch with the random-projection ("fast") check
    Q, p, G, h, A, b = (t.requires_grad_() for t in random_qp(gen, f64, B=3, n=8, m=6, k=2))
    assert torch.autograd.gradcheck(f, (Q, p, G, h, A, b), eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=True)


@pytest.mark.parametrize("which", ["equality-only", "inequality-only", "unconstrained"])
def test_gradcheck_constraint_subsets(gen: torch.Generator, f64: torch.dtype, which: str) -> None:
    Q, p, G, h, A, b = (t.requires_grad_() for t in random_qp(gen, f64, B=2, n=4, m=3, k=1))
    if which == "equality-only":
        fn, args = (lambda Q, p, A, b: solve_qp(0.5 * (Q + Q.mT), p, A=A, b=b)), (Q, p, A, b)
    elif which == "inequality-only":
        fn, args = (lambda Q, p, G, h: solve_qp(0.5 * (Q + Q.mT), p, G, h, tol=1e-12)), (Q, p, G, h)
    else:
        fn, args = (lambda Q, p: solve_qp(0.5 * (Q + Q.mT), p)), (Q, p)
    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-6, rtol=1e-4)


def test_unconstrained_is_linear_solve(gen: torch.Generator, f64: torch.dtype) -> None:
    Q, p, *_ = random_qp(gen, f64)
    z = solve_qp(Q, p)
    torch.testing.assert_close(z, -torch.linalg.solve(Q, p), rtol=1e-10, atol=1e-10)


def test_central_finite_differences(gen: torch.Generator, f64: torch.dtype) -> None:
    """Directional derivative of a scalar loss w.r.t. (Q, p, h) against central differences."""
    Q, p, G, h, A, b = random_qp(gen, f64, B=2)
    w = torch.randn(2, Q.shape[-1], generator=gen, dtype=f64)
    dQ = torch.randn(Q.shape, generator=gen, dtype=f64)
    dQ = dQ + dQ.mT
    dp, dh = torch.randn(p.shape, generator=gen, dtype=f64), torch.randn(h.shape, generator=gen, dtype=f64)

    def loss(t: float) -> torch.Tensor:
        return (w * solve_qp(Q + t * dQ, p + t * dp, G, h + t * dh, A, b, tol=1e-13)).sum()

    Qg, pg, hg = Q.clone().requires_grad_(), p.clone().requires_grad_(), h.clone().requires_grad_()
    (w * solve_qp(Qg, pg, G, hg, A, b, tol=1e-13)).sum().backward()
    analytic = (Qg.grad * dQ).sum() + (pg.grad * dp).sum() + (hg.grad * dh).sum()
    eps = 1e-6
    numeric = (loss(eps) - loss(-eps)) / (2 * eps)
    assert abs(float(analytic - numeric)) < 1e-6 * (1 + abs(float(numeric)))


def test_shared_inputs_broadcast_and_sum_gradients(gen: torch.Generator, f64: torch.dtype) -> None:
    Q, p, G, h, A, b = random_qp(gen, f64, B=3)
    Gs = G[0].clone().requires_grad_()
    hs = ((Gs.detach() @ torch.zeros(Q.shape[-1], dtype=f64)) + 1.0).requires_grad_()
    z = solve_qp(Q, p, Gs, hs)
    assert z.shape == (3, Q.shape[-1])
    z.sum().backward()
    # the gradient of a shared input is the sum of the per-problem gradients
    grads = []
    for i in range(3):
        Gi, hi = Gs.detach().clone().requires_grad_(), hs.detach().clone().requires_grad_()
        solve_qp(Q[i], p[i], Gi, hi).sum().backward()
        grads.append(Gi.grad)
    torch.testing.assert_close(Gs.grad, sum(grads), rtol=1e-7, atol=1e-9)


def test_float32_inputs_return_float32(gen: torch.Generator) -> None:
    Q, p, G, h, A, b = random_qp(gen, torch.float32)
    z, info = solve_qp(Q, p, G, h, A, b, return_info=True)
    assert z.dtype == torch.float32
    assert float(info.residual.max()) < 1e-5


def test_singular_psd_q_no_failure(gen: torch.Generator, f64: torch.dtype) -> None:
    """Rank-deficient Q (and Q = 0: a bounded LP) solve without error, NaN, or KKT violation."""
    Q, p, G, h, A, b = random_qp(gen, f64, n=6, m=12, rank=2)
    box = torch.cat([torch.eye(6, dtype=f64), -torch.eye(6, dtype=f64)])  # keeps the problem bounded
    b = (A @ (0.5 * torch.rand(3, 6, 1, generator=gen, dtype=f64)))[..., 0]  # feasible inside the box
    for Qx in (Q, torch.zeros_like(Q)):
        Qx = Qx.clone().requires_grad_()
        z, info = solve_qp(Qx, p, box, torch.ones(12, dtype=f64), A, b, return_info=True)
        assert torch.isfinite(z).all()
        assert float(info.residual.max()) < 1e-8
        z.sum().backward()
        assert torch.isfinite(Qx.grad).all()


def test_early_stopping_returns_the_iterate(gen: torch.Generator, f64: torch.dtype) -> None:
    Q, p, G, h, A, b = random_qp(gen, f64)
    Qg = Q.clone().requires_grad_()
    z3, info3 = solve_qp(Qg, p, G, h, A, b, max_iter=3, return_info=True)
    z, info = solve_qp(Q, p, G, h, A, b, return_info=True)
    assert info3.iterations.tolist() == [3, 3, 3]
    assert not bool(info3.converged.any())
    assert float((z3 - z).detach().abs().max()) > 1e-4  # genuinely stopped early
    assert float(info3.residual.max()) > float(info.residual.max())
    z3.sum().backward()
    assert torch.isfinite(Qg.grad).all()


def test_kkt_residual_reports_what_solver_reached(gen: torch.Generator, f64: torch.dtype) -> None:
    Q, p, G, h, A, b = random_qp(gen, f64)
    z, info = solve_qp(Q, p, G, h, A, b, return_info=True)
    # at a perturbed point the residual is large
    lam = torch.zeros(G.shape[:2], dtype=f64)
    nu = torch.zeros(A.shape[:2], dtype=f64)
    assert float(kkt_residual(Q, p, G, h, A, b, z + 0.1, lam, nu).min()) > 1e-3
    assert float(info.residual.max()) < 1e-10


def test_infeasible_problem_warns(gen: torch.Generator, f64: torch.dtype) -> None:
    Q, p, *_ = random_qp(gen, f64, B=1, n=2)
    G = torch.tensor([[1.0, 0.0], [-1.0, 0.0]], dtype=f64)
    h = torch.tensor([-1.0, -1.0], dtype=f64)  # z0 <= -1 and z0 >= 1
    with pytest.warns(UserWarning, match="did not converge"):
        z = solve_qp(Q, p, G, h)
    assert torch.isfinite(z).all()


def test_qpth_failure_is_reported(gen: torch.Generator, f64: torch.dtype) -> None:
    Q, p, G, h, A, b = random_qp(gen, f64, n=6, m=12, rank=2)
    G = torch.cat([torch.eye(6, dtype=f64), -torch.eye(6, dtype=f64)])
    h = torch.ones(12, dtype=f64)
    b = (A @ (0.5 * torch.rand(3, 6, 1, generator=gen, dtype=f64)))[..., 0]
    with pytest.raises(RuntimeError, match="qpth backend failed"):
        solve_qp(Q, p, G, h, A, b, backend="qpth")
    z = solve_qp(Q, p, G, h, A, b)  # the native backend handles the singular Q
    assert torch.isfinite(z).all()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"G": "only"}, "G and h must be given together"),
        ({"p": "wrong"}, "Q must be"),
        ({"backend": "cvx"}, "backend must be"),
        ({"max_iter": 0}, "max_iter must be"),
        ({"tol": 0.0}, "tol must be"),
        ({"nan": True}, "non-finite"),
        ({"batch": True}, "inconsistent batch sizes"),
    ],
)
def test_bad_input(gen: torch.Generator, f64: torch.dtype, kwargs: dict, match: str) -> None:
    Q, p, G, h, A, b = random_qp(gen, f64)
    args: dict = {"Q": Q, "p": p, "G": G, "h": h, "A": A, "b": b}
    if kwargs.get("G") == "only":
        args["h"] = None
    elif kwargs.get("p") == "wrong":
        args["p"] = p[:, :-1]
        args["G"] = args["h"] = args["A"] = args["b"] = None
    elif kwargs.get("nan"):
        args["p"] = p.clone()
        args["p"][0, 0] = float("nan")
    elif kwargs.get("batch"):
        args["p"] = torch.cat([p, p])
    else:
        args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        solve_qp(**args)


# ----------------------------------------------------------------------------- structured SVM dual


@pytest.mark.parametrize("way, shot, d", [(3, 2, 8), (5, 3, 40), (4, 5, 6)])
def test_structured_solver_agrees_with_generic_layer(gen: torch.Generator, f64: torch.dtype,
                                                     way: int, shot: int, d: int) -> None:
    X, labels, Y = cs_episode(gen, f64, 2, way, shot, d)
    K = X @ X.mT
    alpha, info = solve_crammer_singer_dual(K, Y, 0.1 * Y, tol=1e-12, return_info=True)
    z, info_g = solve_qp(*crammer_singer_qp(K, Y, 0.1 * Y), return_info=True)
    assert float(info.residual.max()) < 1e-10 and float(info_g.residual.max()) < 1e-10
    # primal weights W = alpha^T X are unique (alpha need not be when d < n)
    torch.testing.assert_close(alpha.mT @ X, z.reshape_as(alpha).mT @ X, rtol=1e-7, atol=1e-9)
    # and so are their gradients
    Kg, Kq = K.clone().requires_grad_(), K.clone().requires_grad_()
    Wd = torch.randn(2, way, X.shape[1], generator=gen, dtype=f64)
    (solve_crammer_singer_dual(Kg, Y, 0.1 * Y) * Wd.mT).sum().backward()
    Qk, p, G, h, A, b = crammer_singer_qp(Kq, Y, 0.1 * Y)
    (solve_qp(Qk, p, G, h, A, b).reshape_as(alpha) * Wd.mT).sum().backward()
    if d >= way * shot:  # unique dual solution: the derivatives agree
        torch.testing.assert_close(Kg.grad, Kq.grad, rtol=1e-5, atol=1e-7)


def test_structured_solver_gradcheck(gen: torch.Generator, f64: torch.dtype) -> None:
    X, labels, Y = cs_episode(gen, f64, 1, 3, 2, 8)
    X.requires_grad_()
    C = torch.tensor(0.1, dtype=f64, requires_grad=True)

    def f(X, C):
        return solve_crammer_singer_dual(X @ X.mT, Y, C * Y, tol=1e-12)

    assert torch.autograd.gradcheck(f, (X, C), eps=1e-6, atol=1e-6, rtol=1e-4)
    X, labels, Y = cs_episode(gen, f64, 3, 5, 3, 20)
    assert torch.autograd.gradcheck(f, (X.requires_grad_(), C), eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=True)


def test_structured_solver_matches_qpth(gen: torch.Generator, f64: torch.dtype) -> None:
    X, labels, Y = cs_episode(gen, f64, 2, 5, 2, 30)
    K = X @ X.mT
    alpha = solve_crammer_singer_dual(K, Y, 0.1 * Y)
    z = solve_qp(*crammer_singer_qp(K, Y, 0.1 * Y), backend="qpth", tol=1e-14)
    torch.testing.assert_close(alpha, z.reshape_as(alpha), rtol=1e-5, atol=1e-7)


def test_structured_early_stopping(gen: torch.Generator, f64: torch.dtype) -> None:
    X, labels, Y = cs_episode(gen, f64, 2, 5, 5, 64)
    K = X @ X.mT
    Kg = K.clone().requires_grad_()
    a3, info3 = solve_crammer_singer_dual(Kg, Y, 0.1 * Y, max_iter=3, return_info=True)
    a, info = solve_crammer_singer_dual(K, Y, 0.1 * Y, return_info=True)
    assert info3.iterations.tolist() == [3, 3] and not bool(info3.converged.any())
    assert float((a3 - a).detach().abs().max()) > 1e-6
    a3.sum().backward()
    assert torch.isfinite(Kg.grad).all()
    # with enough iterations the interior-point path reaches the exact solution too
    a50 = solve_crammer_singer_dual(K, Y, 0.1 * Y, max_iter=60, tol=1e-13)
    torch.testing.assert_close(a50, a, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("case", ["rank-deficient", "duplicates", "zeros", "scaled-1e3", "float32"])
def test_structured_solver_degenerate_inputs(gen: torch.Generator, f64: torch.dtype, case: str) -> None:
    dtype = torch.float32 if case == "float32" else f64
    X, labels, Y = cs_episode(gen, dtype, 3, 5, 4, 8 if case == "rank-deficient" else 64,
                              scale=1e3 if case == "scaled-1e3" else 1.0)
    if case == "duplicates":
        X[:, 5:10] = X[:, 0:5]
    if case == "zeros":
        X = torch.zeros_like(X)
    X.requires_grad_()
    K = X @ X.mT
    alpha, info = solve_crammer_singer_dual(K, Y, 0.1 * Y, return_info=True)
    assert torch.isfinite(alpha).all()
    kscale = 1.0 + float(K.detach().abs().max())
    assert float(info.residual.max()) < (1e-5 if dtype == torch.float32 else 1e-8) * kscale * 0.1 + 1e-8
    (alpha.mT @ X).square().sum().backward()
    assert torch.isfinite(X.grad).all()


def test_structured_bad_input(gen: torch.Generator, f64: torch.dtype) -> None:
    X, labels, Y = cs_episode(gen, f64, 2, 3, 2, 5)
    K = X @ X.mT
    with pytest.raises(ValueError, match="positive sum"):
        solve_crammer_singer_dual(K, Y, 0 * Y)
    with pytest.raises(ValueError, match="gram must be"):
        solve_crammer_singer_dual(K[:, :-1, :-1], Y, Y)
    with pytest.raises(ValueError, match="upper"):
        solve_crammer_singer_dual(K, Y, Y[:, :, :-1])
    with pytest.raises(ValueError, match="non-finite"):
        solve_crammer_singer_dual(K * float("inf"), Y, Y)


# ----------------------------------------------------------------------------- qpth-style early stopping


@pytest.mark.parametrize("k", [1, 3, 15])
@pytest.mark.parametrize("way, shot, d", [(5, 1, 64), (5, 5, 1600)], ids=["5w1s-d64", "5w5s-d1600"])
def test_qpth_early_stop_reproduces_metaoptnet_qpth(gen: torch.Generator, f64: torch.dtype,
                                                    way: int, shot: int, d: int, k: int) -> None:
    """early_stop="qpth" returns qpth's maxIter=k point of MetaOptNet's QP, and qpth's gradients.

    Reference: qpth itself on MetaOptNet's construction (kron(K, I) + 1.0 I, C = 0.1), a batch of
    3 episodes (qpth's exit rules act on the whole batch). Checked for the structured solver and
    the generic layer, for alpha and for the gradients w.r.t. the features X and C.
    """
    X, _, labels = relu_features(gen, f64, 3, way, shot, d)
    Y = F.one_hot(labels, way).to(f64)
    R = torch.randn(Y.shape, generator=gen, dtype=f64)  # a random linear functional of alpha
    eye = torch.eye(way * shot, dtype=f64)

    def run(solver: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        Xg, C = X.clone().requires_grad_(), torch.tensor(0.1, dtype=f64, requires_grad=True)
        K = Xg @ Xg.mT
        if solver == "qpth":
            alpha = metaoptnet_qpth(K, labels, way, C, k)
        elif solver == "structured":
            alpha = solve_crammer_singer_dual(K + eye, Y, C * Y, max_iter=k, early_stop="qpth")
        else:
            alpha = solve_qp(*crammer_singer_qp(K + eye, Y, C * Y), max_iter=k, early_stop="qpth").reshape(Y.shape)
        (alpha * R).sum().backward()
        return alpha.detach(), Xg.grad, C.grad

    ref = run("qpth")
    # qpth's own float64 round-off: after ~10 iterations its Newton and backward systems are
    # ill-conditioned (cond ~1e9) and its LU/Schur elimination loses digits; measured here
    # 1.6e-7 (alpha) and 6e-5 (dX) at 5w5s, k=15, where our solves are exact to 1e-15
    # (test_qpth_early_stop_backward_solve_is_accurate).
    tol = {"alpha": 1e-5, "dX": 1e-3 if k == 15 else 1e-8, "dC": 1e-5 if k == 15 else 1e-8}
    got = {solver: run(solver) for solver in ("structured", "generic")}
    for solver, vals in got.items():
        for name, a, r in zip(("alpha", "dX", "dC"), vals, ref):
            assert max_rel(a, r) <= tol[name], (solver, name, max_rel(a, r))
    for name, a, r in zip(("alpha", "dX", "dC"), got["structured"], got["generic"]):  # two linear algebras
        assert max_rel(a, r) <= 1e-10, ("structured vs generic", name, max_rel(a, r))
    if k == 3:
        # the native interior-point method stopped after 3 iterations is a different point
        native = solve_crammer_singer_dual(X @ X.mT + eye, Y, 0.1 * Y, max_iter=3)
        assert max_rel(native, ref[0]) > 1e-2
        # and qpth's 3rd iterate is not the exact solution either (the mode matters)
        assert max_rel(solve_crammer_singer_dual(X @ X.mT + eye, Y, 0.1 * Y), ref[0]) > 1e-5


def test_qpth_early_stop_backward_solve_is_accurate(gen: torch.Generator, f64: torch.dtype) -> None:
    """qpth's backward system at its 15th iterate of MetaOptNet's 5w5s QP, solved to round-off.

    dL/dp = dx solves ``[[Q + D, A'], [A, 0]] [dx; dnu] = [-g; 0]`` with ``D = max(lam, 1e-8) /
    max(s, 1e-8)``; reference: a dense LU solve with three steps of iterative refinement.
    qpth's own solution of this system is off by ~1e-4 (the tolerance above).
    """
    from bilevel.qp._qpth_pdipm import DenseOps, pdipm

    X, _, labels = relu_features(gen, f64, 3, 5, 5, 1600)
    Y = F.one_hot(labels, 5).to(f64)
    Q, p, G, h, A, b = crammer_singer_qp(X @ X.mT + torch.eye(25, dtype=f64), Y, 0.1 * Y)
    g = torch.randn(p.shape, generator=gen, dtype=f64)
    pg = p.clone().requires_grad_()
    (g * solve_qp(Q, pg, G, h, A, b, max_iter=15, early_stop="qpth")).sum().backward()
    it = pdipm(DenseOps(Q, G.expand(3, -1, -1), A.expand(3, -1, -1)), p, h, b.expand(3, -1), 15)
    D = it["z"].clamp_min(1e-8) / it["s"].clamp_min(1e-8)
    Ae = A.expand(3, -1, -1)
    M = torch.cat([torch.cat([Q + torch.diag_embed(D), Ae.mT], -1),
                   torch.cat([Ae, torch.zeros(3, 25, 25, dtype=f64)], -1)], -2)
    rhs = torch.cat([-g, torch.zeros(3, 25, dtype=f64)], -1)[..., None]
    sol = torch.linalg.solve(M, rhs)
    for _ in range(3):
        sol = sol + torch.linalg.solve(M, rhs - M @ sol)
    assert float(torch.linalg.cond(M).max()) > 1e7  # the regime where qpth's elimination loses digits
    assert max_rel(pg.grad, sol[:, :125, 0]) <= 1e-10


def test_qpth_early_stop_one_iteration_is_qpths_initial_point(gen: torch.Generator, f64: torch.dtype) -> None:
    """Closed form of qpth's maxIter=1 output: the initial point, argmin 1/2 x'Qx + p'x + 1/2|Gx - h|^2, Ax = b.

    (qpth evaluates iterate i at loop pass i and returns its best evaluated iterate, so the
    maxIter-th step is never returned.)
    """
    Q, p, G, h, A, b = random_qp(gen, f64)
    N, E = Q.shape[-1], A.shape[-2]
    M = torch.cat([torch.cat([Q + G.mT @ G, A.mT], -1), torch.cat([A, torch.zeros(3, E, E, dtype=f64)], -1)], -2)
    x0 = torch.linalg.solve(M, torch.cat([-p + (G.mT @ h[..., None])[..., 0], b], -1))[..., :N]
    z1, info = solve_qp(Q, p, G, h, A, b, max_iter=1, early_stop="qpth", return_info=True)
    torch.testing.assert_close(z1, x0, rtol=1e-10, atol=1e-12)
    assert info.iterations.tolist() == [0, 0, 0] and not bool(info.converged.any())


@pytest.mark.parametrize("k", [1, 3, 15])
@pytest.mark.parametrize("constraints", ["both", "inequality-only", "equality-only"])
def test_qpth_early_stop_generic_qp_matches_qpth(gen: torch.Generator, f64: torch.dtype, k: int,
                                                 constraints: str) -> None:
    """Random batched QPs: z and the gradients w.r.t. every (batched) input agree with qpth's."""
    from qpth.qp import QPFunction

    data = random_qp(gen, f64)
    w = torch.randn(data[1].shape, generator=gen, dtype=f64)
    empty = torch.empty(0, dtype=f64)

    def run(ours: bool) -> list[torch.Tensor]:
        Q, p, G, h, A, b = (t.clone().requires_grad_() for t in data)
        Qs = 0.5 * (Q + Q.mT)
        if constraints == "equality-only":
            G, h = torch.zeros(3, 1, 6, dtype=f64, requires_grad=True), torch.ones(3, 1, dtype=f64, requires_grad=True)
        if ours:
            kw = {} if constraints == "equality-only" else {"G": G, "h": h}
            if constraints != "inequality-only":
                kw.update(A=A, b=b)
            z = solve_qp(Qs, p, max_iter=k, early_stop="qpth", **kw)
        else:
            Aq, bq = (empty, empty) if constraints == "inequality-only" else (A, b)
            z = QPFunction(verbose=-1, maxIter=k)(Qs, p, G, h, Aq, bq)
        (w * z).sum().backward()
        grads = [Q.grad, p.grad] + ([G.grad, h.grad] if constraints != "equality-only" else [])
        return [z.detach()] + grads + ([A.grad, b.grad] if constraints != "inequality-only" else [])

    for name, a, r in zip(("z", "dQ", "dp", "dG/dA", "dh/db", "dA", "db"), run(True), run(False)):
        assert max_rel(a, r) <= 1e-6, (name, max_rel(a, r))


def test_qpth_early_stop_info_and_errors(gen: torch.Generator, f64: torch.dtype) -> None:
    Q, p, G, h, A, b = random_qp(gen, f64)
    z, info = solve_qp(Q, p, G, h, A, b, max_iter=3, early_stop="qpth", return_info=True)
    assert int(info.iterations.max()) <= 2  # qpth returns its best of iterates 0, 1, 2
    assert not bool(info.converged.any()) and float(info.residual.min()) > 1e-6
    z40, info40 = solve_qp(Q, p, G, h, A, b, max_iter=40, early_stop="qpth", return_info=True)
    torch.testing.assert_close(z40, solve_qp(Q, p, G, h, A, b), rtol=1e-6, atol=1e-8)  # converges
    with pytest.raises(ValueError, match="give max_iter"):
        solve_qp(Q, p, G, h, A, b, early_stop="qpth")
    with pytest.raises(ValueError, match="early_stop must be"):
        solve_qp(Q, p, G, h, A, b, max_iter=3, early_stop="osqp")
    with pytest.raises(ValueError, match="positive-definite Q"):
        solve_qp(torch.zeros_like(Q), p, G, h, A, b, max_iter=3, early_stop="qpth")
    X, labels, Y = cs_episode(gen, f64, 2, 5, 4, 8)  # n = 20 > d = 8: K is singular
    with pytest.raises(ValueError, match="positive-definite gram"):
        solve_crammer_singer_dual(X @ X.mT, Y, 0.1 * Y, max_iter=3, early_stop="qpth")
    with pytest.raises(ValueError, match="give max_iter"):
        solve_crammer_singer_dual(X @ X.mT, Y, 0.1 * Y, early_stop="qpth")

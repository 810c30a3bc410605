"""Convergence certificates of Implicit(): optimality and linear-solve residuals (issue 13, part 2)."""
from __future__ import annotations

import math
import re
import warnings

import pytest
import torch

import bilevel as bl
from bilevel.linsolve import DivergenceError, LinearSolveInfo


class WeightedRidge:
    """Per-example-weight ridge: L(w; a) = mean_i σ(a_i)(x_iᵀw − y_i)²/2 + 0.05‖w‖², E = validation MSE/2."""

    def __init__(self, dtype: torch.dtype, n: int = 40, d: int = 6, nv: int = 30) -> None:
        g = torch.Generator().manual_seed(0)
        f64 = torch.float64
        X, w_true = torch.randn(n, d, generator=g, dtype=f64), torch.randn(d, generator=g, dtype=f64)
        y = X @ w_true + 0.5 * torch.randn(n, generator=g, dtype=f64)
        Xv = torch.randn(nv, d, generator=g, dtype=f64)
        yv = Xv @ w_true + 0.5 * torch.randn(nv, generator=g, dtype=f64)
        self.train, self.val = (X.to(dtype), y.to(dtype)), (Xv.to(dtype), yv.to(dtype))
        self.n, self.d, self.dtype = n, d, dtype
        self.problem = bl.BilevelProblem(self.inner, self.outer)

    @staticmethod
    def inner(p, h, b):
        X, y = b
        return 0.5 * (torch.sigmoid(h["a"]) * (X @ p["w"] - y) ** 2).mean() + 0.05 * (p["w"] ** 2).sum()

    @staticmethod
    def outer(p, h, b):
        X, y = b
        return 0.5 * ((X @ p["w"] - y) ** 2).mean()

    def params0(self):
        return {"w": torch.zeros(self.d, dtype=self.dtype)}

    def hparams(self):
        return {"a": torch.zeros(self.n, dtype=self.dtype, requires_grad=True)}

    def hypergradient(self, strategy, steps, lr=0.1, params0=None):
        return bl.hypergradient(self.problem, params0 or self.params0(), self.hparams(), self.train, self.val,
                                dynamics=bl.GradientDescent(lr), steps=steps, hypergrad=strategy)

    def hessian(self, w):
        X, _ = self.train
        s = torch.sigmoid(torch.zeros(self.n, dtype=self.dtype))
        return X.T @ (s[:, None] * X) / self.n + 0.1 * torch.eye(self.d, dtype=self.dtype)


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _number(name: str, message: str) -> float:
    m = re.search(re.escape(name) + r" = ([0-9.e+-]+)", message)
    assert m, (name, message)
    return float(m.group(1))


# ----------------------------------------------------------------------------- the finding
@pytest.mark.parametrize("steps", [3, 10])
def test_unconverged_inner_solution_warns_with_both_numbers(f64, steps):
    """Issue 13: Implicit(CG(50)) at T = 3 / 10 was 300% / 36% off Reverse() without a word."""
    pr = WeightedRidge(f64)
    exact = pr.hypergradient(bl.Reverse(), steps).hparams["a"]
    with pytest.warns(bl.InexactHypergradientWarning) as rec:
        r = pr.hypergradient(bl.Implicit(bl.CG(50)), steps)
    assert _rel(r.hparams["a"], exact) > 0.3  # the warning tells the truth
    (w,) = [x for x in rec if issubclass(x.category, bl.InexactHypergradientWarning)]
    msg = str(w.message)
    assert w.filename == __file__  # attributed to the caller, not to torch's autograd
    opt = _number("‖F(w_T, λ)‖/‖F(w_0, λ)‖", msg)
    lin = _number("‖A u − b‖/‖b‖", msg)
    assert opt == pytest.approx(r.info.optimality, rel=1e-3) and opt > 0.4
    assert lin == pytest.approx(r.info.linear.residual, rel=1e-3) and lin < 1e-12
    assert f"after {steps} inner steps" in msg and "run more inner steps" in msg
    assert "(ABOVE tol;" in msg and "(ok) after" in msg


def test_converged_inner_solution_is_silent_and_exact(f64):
    pr = WeightedRidge(f64)
    exact = pr.hypergradient(bl.Reverse(), 1000).hparams["a"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = pr.hypergradient(bl.Implicit(bl.CG(50)), 1000)
    assert _rel(r.hparams["a"], exact) < 1e-10
    assert r.info.optimality < 1e-12 and r.info.linear.residual < 1e-12


def test_converged_float32_is_silent(f64):
    pr64, pr32 = WeightedRidge(f64), WeightedRidge(torch.float32)
    ref = pr64.hypergradient(bl.Implicit(bl.Exact()), 1000).hparams["a"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for solver in (bl.CG(50), bl.Neumann(200, alpha=1.0), bl.Exact()):
            r = pr32.hypergradient(bl.Implicit(solver), 1000)
            assert _rel(r.hparams["a"].double(), ref) < 1e-4, solver
            assert r.info.optimality < 1e-5 and r.info.linear.residual < 1e-5


def test_on_inexact_raise_and_ignore(f64):
    pr = WeightedRidge(f64)
    with pytest.raises(bl.InexactHypergradientError, match=r"Optimality residual .* = 4\.5\d\de-01 \(ABOVE tol"):
        pr.hypergradient(bl.Implicit(bl.CG(50), on_inexact="raise"), 10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = pr.hypergradient(bl.Implicit(bl.CG(50), on_inexact="ignore"), 10)
    assert r.info.optimality == pytest.approx(0.45, abs=0.01)  # still measured


def test_tol_and_atol(f64):
    pr = WeightedRidge(f64)
    r = pr.hypergradient(bl.Implicit(bl.CG(50), on_inexact="ignore"), 100)
    assert 1e-3 < r.info.optimality < 1e-2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pr.hypergradient(bl.Implicit(bl.CG(50), tol=1e-2), 100)
        pr.hypergradient(bl.Implicit(bl.CG(50), atol=1.01 * r.info.optimality_norm), 100)
    with pytest.warns(bl.InexactHypergradientWarning):
        pr.hypergradient(bl.Implicit(bl.CG(50), atol=0.99 * r.info.optimality_norm), 100)


def test_inexact_linear_solve_warns(f64):
    pr = WeightedRidge(f64)
    with pytest.warns(bl.InexactHypergradientWarning, match=r"\(ok;.*ABOVE tol\) after 2 CG iterations.*More CG iterations \(CG\(maxiter > 2\)\)"):
        r = pr.hypergradient(bl.Implicit(bl.CG(2)), 1000)
    assert r.info.linear.iterations == 2 and r.info.linear.residual > 1e-3
    with pytest.warns(bl.InexactHypergradientWarning, match=r"More Neumann terms \(maxiter > 2\) or another alpha"):
        pr.hypergradient(bl.Implicit(bl.Neumann(2, alpha=0.5)), 1000)


# ----------------------------------------------------------------------------- divergence
def test_diverging_neumann_raises_with_numbers(f64):
    """Issue 13: Implicit(Neumann(100, alpha=5)) returned -3.5e119 silently."""
    pr = WeightedRidge(f64)
    lam_max = float(torch.linalg.eigvalsh(pr.hessian(None)).max())
    assert 5 * lam_max > 2  # alpha = 5 is beyond 2/λ_max
    with pytest.raises(DivergenceError, match=r"Neumann\(maxiter=100, alpha=5\) diverges: the residual ‖b − A u‖ grew from") as e:
        pr.hypergradient(bl.Implicit(bl.Neumann(100, alpha=5)), 1000)
    bound = float(re.search(r"alpha below ≈ ([0-9.]+)", str(e.value)).group(1))
    assert bound == pytest.approx(2 / lam_max, rel=0.01)  # estimated from the growth rate
    with pytest.raises(DivergenceError, match="became non-finite"):  # float32 overflows
        WeightedRidge(torch.float32).hypergradient(bl.Implicit(bl.Neumann(100, alpha=5)), 1000)
    with pytest.raises(DivergenceError):  # whatever on_inexact says
        pr.hypergradient(bl.Implicit(bl.Neumann(100, alpha=5), on_inexact="ignore"), 1000)


def test_diverging_fixed_point_raises(f64):
    """A fixed-point map that is not a contraction (GD step too large) is detected."""
    pr = WeightedRidge(f64)

    def big_step(p, h, b):
        (g,) = torch.autograd.grad(pr.inner(p, h, b), [p["w"]], create_graph=True)
        return {"w": p["w"] - 5.0 * g}

    strat = bl.Implicit(bl.FixedPoint(100), condition=bl.fixed_point_condition(big_step))
    with pytest.raises(DivergenceError, match=r"FixedPoint\(maxiter=100\) diverges.*contraction"):
        pr.hypergradient(strat, 1000)


# ----------------------------------------------------------------------------- the info record
def test_solve_return_info_is_filled_by_the_backward_pass(f64):
    pr = WeightedRidge(f64)
    hp = pr.hparams()
    w, info = bl.solve(pr.problem, pr.params0(), hp, pr.train, dynamics=bl.GradientDescent(0.1), steps=1000,
                       hypergrad=bl.Implicit(bl.CG(3), on_inexact="ignore"), return_info=True)
    assert isinstance(info, bl.SolveInfo) and info.steps == 1000
    assert info.optimality < 1e-12 and info.linear is None and info.linear_solution is None
    b = torch.autograd.grad(pr.outer(w, hp, pr.val), w["w"], retain_graph=True)[0]
    pr.outer(w, hp, pr.val).backward()
    assert isinstance(info.linear, LinearSolveInfo) and info.linear.iterations == 3
    u = info.linear_solution["w"]
    true_residual = float((pr.hessian(None) @ u - b).norm() / b.norm())  # A = the inner Hessian, explicitly
    assert info.linear.residual == pytest.approx(true_residual, rel=1e-10)
    assert info.as_dict() == {"optimality": info.optimality, "linear_residual": info.linear.residual,
                              "linear_iterations": 3.0}
    # other strategies measure nothing
    w2, st, info2 = bl.solve(pr.problem, pr.params0(), pr.hparams(), pr.train, dynamics=bl.GradientDescent(0.1), steps=3,
                             return_state=True, return_info=True)
    assert isinstance(st, bl.InnerState) and info2.optimality is None and info2.as_dict() == {}


def test_scale_is_carried_by_the_inner_state(f64):
    """A run continued from its InnerState keeps the cold start's scale; from a plain dict it cannot."""
    pr = WeightedRidge(f64)
    strat = bl.Implicit(bl.CG(50))
    with torch.no_grad():
        w_conv = bl.solve(pr.problem, pr.params0(), pr.hparams(), pr.train, dynamics=bl.GradientDescent(0.1), steps=1000)
    _, state, info = bl.solve(pr.problem, pr.params0(), pr.hparams(), pr.train, dynamics=bl.GradientDescent(0.1),
                              steps=1000, hypergrad=strat, return_state=True, return_info=True)
    assert state.optimality_scale == info.optimality_scale > 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = pr.hypergradient(strat, 1, params0=state)  # hypergradient accepts the InnerState too
    assert r.info.optimality_scale == state.optimality_scale and r.info.optimality < 1e-12
    # from the converged point as a dict, the scale is the (tiny) residual of that point
    with pytest.warns(bl.InexactHypergradientWarning, match=r"if it started at a converged point, pass the InnerState"):
        pr.hypergradient(strat, 1, params0=w_conv)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pr.hypergradient(bl.Implicit(bl.CG(50), atol=1e-10), 1, params0=w_conv)


def test_cg_breakdown_keeps_its_warning_and_explains(f64):
    prob = bl.BilevelProblem(lambda p, h, b: -((p["w"] - h["c"]) ** 2).sum(), lambda p, h, b: p["w"].sum())
    c = torch.ones(3, dtype=f64, requires_grad=True)
    w = bl.solve(prob, {"w": torch.ones(3, dtype=f64)}, {"c": c}, None, dynamics=bl.GradientDescent(0.01), steps=1,
                 hypergrad=bl.Implicit(bl.CG(5)))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        prob.outer_loss(w, {}, None).backward()
    messages = [str(x.message) for x in rec]
    assert any("non-positive curvature" in m for m in messages)
    (inexact,) = [m for m in messages if "inexact" in m]
    assert "not positive definite at w_T" in inexact and "more CG iterations do not help" in inexact


def test_implicit_options_are_validated():
    with pytest.raises(ValueError, match=r"Implicit\(tol=...\) must be a finite number >= 0, got -1"):
        bl.Implicit(tol=-1)
    with pytest.raises(ValueError, match=r"Implicit\(atol=...\) must be a finite number >= 0, got inf"):
        bl.Implicit(atol=math.inf)
    with pytest.raises(ValueError, match=r"on_inexact=...\) must be one of \['warn', 'raise', 'ignore'\], got 'loud'"):
        bl.Implicit(on_inexact="loud")
    with pytest.raises(TypeError, match="warm_start"):
        bl.Implicit(warm_start=1)


# ----------------------------------------------------------------------------- the solvers themselves
def _spd(f64, n=8, cond=20.0):
    g = torch.Generator().manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=f64))
    a = q @ torch.diag(torch.linspace(1.0, cond, n, dtype=f64)) @ q.T
    b = torch.randn(n, generator=g, dtype=f64)
    return a, b


@pytest.mark.parametrize("solver", [bl.CG(3), bl.Neumann(5, alpha=0.05), bl.FixedPoint(4), bl.Exact()], ids=str)
def test_solvers_report_the_true_residual(f64, solver):
    a, b = _spd(f64)
    a_fp = a / 25.0 if isinstance(solver, bl.FixedPoint) else a  # FixedPoint needs ρ(I − A) < 1
    u, info = solver.solve(lambda v: {"x": a_fp @ v["x"]}, {"x": b})
    assert info.residual == pytest.approx(float((a_fp @ u["x"] - b).norm() / b.norm()), rel=1e-9)
    assert info.iterations >= 1 and info.matvecs >= info.iterations and not info.breakdown


def test_neumann_is_still_the_truncated_series(f64):
    a, b = _spd(f64)
    alpha, k = 0.05, 6
    m = torch.eye(8, dtype=f64) - alpha * a
    series = alpha * sum(torch.linalg.matrix_power(m, i) @ b for i in range(k + 1))
    u, info = bl.Neumann(k, alpha).solve(lambda v: {"x": a @ v["x"]}, {"x": b})
    assert torch.allclose(u["x"], series, rtol=1e-12, atol=1e-14)
    assert info.residual == pytest.approx(float((m @ torch.linalg.matrix_power(m, k) @ b).norm() / b.norm()), rel=1e-9)


@pytest.mark.parametrize("solver", [bl.CG(4, tol=0.0), bl.Neumann(10, alpha=0.05), bl.FixedPoint(10, tol=0.0)], ids=str)
def test_warm_start_from_x0(f64, solver):
    """From a good initial guess the same iterations reach a smaller residual; x0 = exact stays exact."""
    a, b = _spd(f64)
    a = a / 25.0 if isinstance(solver, bl.FixedPoint) else a
    exact = torch.linalg.solve(a, b)
    mv = lambda v: {"x": a @ v["x"]}  # noqa: E731
    _, cold = solver.solve(mv, {"x": b})
    u, warm = solver.solve(mv, {"x": b}, {"x": exact + 1e-3 * b})
    assert warm.residual < 0.1 * cold.residual
    assert warm.residual == pytest.approx(float((a @ u["x"] - b).norm() / b.norm()), rel=1e-9)
    u, _ = solver.solve(mv, {"x": b}, {"x": exact})
    assert torch.allclose(u["x"], exact, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match=r"initial guess x0\['x'\] has shape \[3\], expected \[8\]"):
        solver.solve(mv, {"x": b}, {"x": torch.zeros(3, dtype=f64)})


def test_cg_x0_none_matches_the_cold_iterates(f64):
    """No warm start: the iterates are those of CG from 0 (the old behaviour)."""
    a, b = _spd(f64)
    u, info = bl.CG(3, tol=0.0).solve(lambda v: {"x": a @ v["x"]}, {"x": b})
    # CG from 0 minimises the A-norm error over the Krylov space span{b, Ab, A²b}
    k = torch.stack([b, a @ b, a @ a @ b], 1)
    coef = torch.linalg.solve(k.T @ a @ k, k.T @ b)
    assert torch.allclose(u["x"], k @ coef, rtol=1e-9, atol=1e-12)
    assert info.iterations == 3 and info.matvecs == 4

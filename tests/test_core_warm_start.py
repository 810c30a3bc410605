"""Warm starts through the implicit path: hypergradient(..., return_state=True) (issue 15, part 1)."""
from __future__ import annotations

import pytest
import torch

import bilevel as bl
from quadratic_bilevel import SimulatedQuadratic

INNER_STEPS, INNER_LR = 10, 1.0  # L_inner = 1


def _outer_loop(q: SimulatedQuadratic, strategy: bl.Strategy, iterations: int, dtype: torch.dtype) -> tuple[list[float], bl.Hypergradient]:
    """Gradient descent on x with warm-started inner variable; ‖∇h(x_k)‖² (closed form) per iteration."""
    d, p = q.dims
    eta = 1.0 / float(torch.linalg.eigvalsh(q.hessian_h()).max())
    x = torch.zeros(p, dtype=dtype)
    state = bl.hypergradient_init({"z": torch.zeros(d, dtype=dtype)})
    history = []
    for _ in range(iterations):
        hg, state = bl.hypergradient(q.problem(), state, {"x": x.clone().requires_grad_(True)}, q.inner_data, q.outer_data,
                                     dynamics=bl.GradientDescent(INNER_LR), steps=INNER_STEPS, hypergrad=strategy,
                                     return_state=True)
        x = x - eta * hg.hparams["x"]
        history.append(float(q.grad_h(x).pow(2).sum()))
    return history, hg


@pytest.mark.parametrize("dtype,floor", [(torch.float64, 1e-10), (torch.float32, 1e-10)], ids=["float64", "float32"])
def test_warm_started_cg_converges_where_the_cold_one_stalls(dtype, floor):
    """Issue 15: Implicit(CG(10)) stalls at ‖∇h‖² ≈ 1e-5 (a fixed bias per step); warm-started it converges."""
    q = SimulatedQuadratic.make(dtype=dtype)
    assert float(torch.linalg.eigvalsh(q.hessian_h()).min()) > 0.5  # h strongly convex: GD converges
    cold, cold_hg = _outer_loop(q, bl.Implicit(bl.CG(10), on_inexact="ignore"), 120, dtype)
    warm, warm_hg = _outer_loop(q, bl.Implicit(bl.CG(10), on_inexact="ignore", warm_start=True), 120, dtype)
    assert warm[-1] <= floor, warm[-1]
    assert cold[-1] > 1e-6, cold[-1]
    assert cold[59] == pytest.approx(cold[-1], rel=0.05)  # a plateau, not slow progress
    # the certificates see it: the cold solve's residual stays at its fixed level, the warm one vanishes
    assert cold_hg.info.linear.residual > 1e-4
    assert warm_hg.info.linear.residual < 1e-6 and warm_hg.info.optimality < 1e-6


def test_state_is_explicit_and_the_step_is_pure(f64):
    q = SimulatedQuadratic.make(dtype=f64)
    d, p = q.dims
    strat = bl.Implicit(bl.CG(10), warm_start=True, on_inexact="ignore")
    x = {"x": torch.ones(p, dtype=f64, requires_grad=True)}
    s0 = bl.hypergradient_init({"z": torch.zeros(d, dtype=f64)})
    assert isinstance(s0, bl.HypergradientState) and s0.linsolve is None
    hg1, s1 = bl.hypergradient(q.problem(), s0, x, q.inner_data, q.outer_data, dynamics=bl.GradientDescent(1.0), steps=5,
                               hypergrad=strat, return_state=True)
    assert isinstance(s1.inner, bl.InnerState) and s1.inner.t == 5 and not s1.inner.dynamics_state.params["z"].requires_grad
    assert set(s1.linsolve) == {"z"} and not s1.linsolve["z"].requires_grad
    assert s1.inner.optimality_scale == hg1.info.optimality_scale > 0
    # same state in, same result out (nothing hidden changed between calls)
    hg2a, s2a = bl.hypergradient(q.problem(), s1, x, q.inner_data, q.outer_data, dynamics=bl.GradientDescent(1.0), steps=5,
                                 hypergrad=strat, return_state=True)
    hg2b, s2b = bl.hypergradient(q.problem(), s1, x, q.inner_data, q.outer_data, dynamics=bl.GradientDescent(1.0), steps=5,
                                 hypergrad=strat, return_state=True)
    assert torch.equal(hg2a.hparams["x"], hg2b.hparams["x"]) and torch.equal(s2a.linsolve["z"], s2b.linsolve["z"])
    assert s2a.inner.t == 10
    # the warm start (from u_1) beats the cold solve of the same system
    cold = bl.hypergradient(q.problem(), s1, x, q.inner_data, q.outer_data, dynamics=bl.GradientDescent(1.0), steps=5,
                            hypergrad=bl.Implicit(bl.CG(10), on_inexact="ignore"))
    assert torch.equal(cold.value, hg2a.value)
    assert hg2a.info.linear.residual < 0.5 * cold.info.linear.residual


def test_without_warm_start_request_nothing_changes(f64):
    """hypergradient(dict) is one cold solve; a state loop without warm_start equals the hand-written loop."""
    q = SimulatedQuadratic.make(dtype=f64)
    d, p = q.dims
    strat = bl.Implicit(bl.CG(10), on_inexact="ignore")
    x = {"x": torch.ones(p, dtype=f64, requires_grad=True)}
    z0 = {"z": torch.zeros(d, dtype=f64)}
    kw = dict(dynamics=bl.GradientDescent(1.0), steps=5, hypergrad=strat)
    hg = bl.hypergradient(q.problem(), z0, x, q.inner_data, q.outer_data, **kw)
    w = bl.solve(q.problem(), z0, x, q.inner_data, **kw)
    (g,) = torch.autograd.grad(q.outer(w, x, q.outer_data), x["x"])
    assert torch.equal(hg.hparams["x"], g)

    state, inner = bl.hypergradient_init(z0), z0
    for _ in range(3):
        hg, state = bl.hypergradient(q.problem(), state, x, q.inner_data, q.outer_data, return_state=True, **kw)
        w, inner = bl.solve(q.problem(), inner, x, q.inner_data, return_state=True, **kw)
        (g,) = torch.autograd.grad(q.outer(w, x, q.outer_data), x["x"])
        assert torch.equal(hg.hparams["x"], g)
        assert state.linsolve is None  # only Implicit(warm_start=True) carries u


def test_solve_linsolve_init(f64):
    q = SimulatedQuadratic.make(dtype=f64)
    d, p = q.dims
    x = {"x": torch.ones(p, dtype=f64, requires_grad=True)}
    kw = dict(dynamics=bl.GradientDescent(1.0), steps=300)
    w, info = bl.solve(q.problem(), {"z": torch.zeros(d, dtype=f64)}, x, q.inner_data, hypergrad=bl.Implicit(bl.CG(50)),
                       return_info=True, **kw)
    (g,) = torch.autograd.grad(q.outer(w, x, q.outer_data), x["x"])
    assert info.linear.iterations > 5
    # from the solution itself, CG stops at once with the same hypergradient
    w2, info2 = bl.solve(q.problem(), {"z": torch.zeros(d, dtype=f64)}, x, q.inner_data, hypergrad=bl.Implicit(bl.CG(50)),
                         return_info=True, linsolve_init=info.linear_solution, **kw)
    (g2,) = torch.autograd.grad(q.outer(w2, x, q.outer_data), x["x"])
    assert info2.linear.iterations == 0 and torch.allclose(g2, g, rtol=1e-9)
    with pytest.raises(ValueError, match=r"linsolve_init is the initial guess of Implicit\(\)'s linear solve; hypergrad=Reverse\(\) solves none"):
        bl.solve(q.problem(), {"z": torch.zeros(d, dtype=f64)}, x, q.inner_data, linsolve_init=info.linear_solution, **kw)

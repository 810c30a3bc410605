"""Every strategy against closed forms and central finite differences (float64)."""
from __future__ import annotations

import warnings

import pytest
import torch

import bilevel as bl
from ridge_closed_form import Ridge

T_STEPS = 25
L2, LR = 0.1, 0.2


@pytest.fixture
def ridge(f64) -> Ridge:
    return Ridge.make(dtype=f64)


def _hg(ridge: Ridge, strategy, steps=T_STEPS, l2=L2, lr=LR, dynamics=None, batch=None):
    hp = ridge.hparams(l2, lr)
    dyn = dynamics or bl.GradientDescent(lr=lambda h: h["lr"])
    return bl.hypergradient(ridge.problem(), ridge.params0(), hp, batch or ridge.train, ridge.val,
                            dynamics=dyn, steps=steps, hypergrad=strategy)


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-300)


EXACT = [bl.Reverse(), bl.Forward(), bl.Truncated(T_STEPS), bl.Checkpointed(4), bl.Checkpointed(1), bl.Forward(chunk_size=1)]


@pytest.mark.parametrize("strategy", EXACT, ids=repr)
def test_exact_unrolled_matches_closed_form(ridge, strategy):
    w_ref, dl2, dlr = ridge.unrolled(L2, LR, T_STEPS)
    w = bl.solve(ridge.problem(), ridge.params0(), ridge.hparams(L2, LR), ridge.train,
                 dynamics=bl.GradientDescent(lr=lambda h: h["lr"]), steps=T_STEPS, hypergrad=strategy)
    assert torch.allclose(w["w"].detach(), w_ref, rtol=1e-12, atol=1e-14)
    r = _hg(ridge, strategy)
    assert _rel(float(r.hparams["l2"]), float(dl2)) < 1e-8
    assert _rel(float(r.hparams["lr"]), float(dlr)) < 1e-8


def _f_unrolled(ridge: Ridge, l2: float, lr: float, steps: int = T_STEPS) -> float:
    with torch.no_grad():
        hp = {"l2": torch.tensor(l2, dtype=torch.float64), "lr": torch.tensor(lr, dtype=torch.float64)}
        w = bl.solve(ridge.problem(), ridge.params0(), hp, ridge.train,
                     dynamics=bl.GradientDescent(lr=lambda h: h["lr"]), steps=steps)
        return float(ridge.outer(w, hp, ridge.val))


@pytest.mark.parametrize("strategy", EXACT, ids=repr)
def test_exact_unrolled_matches_finite_differences(ridge, strategy):
    r = _hg(ridge, strategy)
    eps = 1e-6
    fd_l2 = (_f_unrolled(ridge, L2 + eps, LR) - _f_unrolled(ridge, L2 - eps, LR)) / (2 * eps)
    fd_lr = (_f_unrolled(ridge, L2, LR + eps) - _f_unrolled(ridge, L2, LR - eps)) / (2 * eps)
    assert _rel(float(r.hparams["l2"]), fd_l2) < 1e-6
    assert _rel(float(r.hparams["lr"]), fd_lr) < 1e-6


@pytest.mark.parametrize("strategy", [bl.Reverse(), bl.Forward(), bl.Checkpointed(3), bl.Truncated(8)], ids=repr)
def test_exact_unrolled_gradcheck(ridge, strategy):
    def f(l2, lr):
        w = bl.solve(ridge.problem(), ridge.params0(), {"l2": l2, "lr": lr}, ridge.train,
                     dynamics=bl.GradientDescent(lr=lambda h: h["lr"]), steps=8, hypergrad=strategy)
        return w["w"]

    hp = ridge.hparams(L2, LR)
    assert torch.autograd.gradcheck(f, (hp["l2"], hp["lr"]), eps=1e-6, atol=1e-8)


def test_truncated_is_finite_difference_of_frozen_prefix(ridge):
    """Truncated(k) is the exact derivative of f when s_{T−k} is frozen at the current λ."""
    k = 5
    r = _hg(ridge, bl.Truncated(k))
    dyn = bl.GradientDescent(lr=lambda h: h["lr"])
    with torch.no_grad():
        hp0 = {n: v.detach() for n, v in ridge.hparams(L2, LR).items()}
        w_split = bl.solve(ridge.problem(), ridge.params0(), hp0, ridge.train, dynamics=dyn, steps=T_STEPS - k)

    def f(l2, lr):
        with torch.no_grad():
            hp = {"l2": torch.tensor(l2, dtype=torch.float64), "lr": torch.tensor(lr, dtype=torch.float64)}
            w = bl.solve(ridge.problem(), w_split, hp, ridge.train, dynamics=dyn, steps=k)
            return float(ridge.outer(w, hp, ridge.val))

    eps = 1e-6
    assert _rel(float(r.hparams["l2"]), (f(L2 + eps, LR) - f(L2 - eps, LR)) / (2 * eps)) < 1e-6
    assert _rel(float(r.hparams["lr"]), (f(L2, LR + eps) - f(L2, LR - eps)) / (2 * eps)) < 1e-6
    # and it is a genuinely different (biased) estimate from the full one
    full = _hg(ridge, bl.Reverse())
    assert _rel(float(r.hparams["l2"]), float(full.hparams["l2"])) > 1e-3


def test_first_order_matches_its_definition(ridge):
    """FirstOrder: w_T = w_0 − η Σ_t g_t with g_t constant, so dE/dη = −Σ_t ∇E·g_t and dE/dλ = 0."""
    r = _hg(ridge, bl.FirstOrder())
    w = ridge.params0()["w"]
    gs = []
    for _ in range(T_STEPS):
        g = ridge.X.T @ (ridge.X @ w - ridge.y) / ridge.X.shape[0] + L2 * w
        gs.append(g)
        w = w - LR * g
    ge = ridge.grad_outer(w)
    assert _rel(float(r.hparams["lr"]), float(-(ge @ torch.stack(gs).sum(0)))) < 1e-10
    assert float(r.hparams["l2"]) == 0.0


def test_first_order_maml_initialisation_gradient_is_identity(ridge):
    p0 = {"w": torch.randn(ridge.X.shape[1], dtype=torch.float64, requires_grad=True)}
    hp = {"l2": torch.tensor(L2, dtype=torch.float64), "lr": torch.tensor(LR, dtype=torch.float64)}
    r = bl.hypergradient(ridge.problem(), p0, hp, ridge.train, ridge.val,
                         dynamics=bl.GradientDescent(lr=LR), steps=3, hypergrad=bl.FirstOrder())
    w = bl.solve(ridge.problem(), p0, hp, ridge.train, dynamics=bl.GradientDescent(lr=LR), steps=3)
    assert torch.allclose(r.params0["w"], ridge.grad_outer(w["w"].detach()), rtol=1e-12)


def test_no_inner_keeps_only_the_explicit_dependence(ridge):
    def outer(p, h, b):  # explicit λ dependence: E = val loss + λ² (so dE/dλ = 2λ exactly)
        return Ridge.outer(p, h, b) + h["l2"] ** 2

    prob = bl.BilevelProblem(Ridge.inner, outer)
    hp = ridge.hparams(L2, LR)
    r = bl.hypergradient(prob, ridge.params0(), hp, ridge.train, ridge.val,
                         dynamics=bl.GradientDescent(lr=lambda h: h["lr"]), steps=T_STEPS, hypergrad=bl.NoInner())
    assert float(r.hparams["l2"]) == pytest.approx(2 * L2, rel=1e-14)
    assert float(r.hparams["lr"]) == 0.0
    w = bl.solve(prob, ridge.params0(), hp, ridge.train, dynamics=bl.GradientDescent(lr=LR), steps=3, hypergrad=bl.NoInner())
    assert not w["w"].requires_grad


# ----------------------------------------------------------------------------- implicit
IMPLICIT_STEPS = 400


@pytest.mark.parametrize(
    "solver,tol",
    [(bl.CG(maxiter=50), 1e-9), (bl.Exact(), 1e-9), (bl.Neumann(maxiter=400, alpha=0.5), 1e-8), (bl.FixedPoint(maxiter=2000, tol=1e-14), 1e-8)],
    ids=repr,
)
def test_implicit_matches_closed_form_argmin(ridge, solver, tol):
    _, ref = ridge.argmin(L2)
    r = _hg(ridge, bl.Implicit(solver), steps=IMPLICIT_STEPS, lr=0.5)
    assert _rel(float(r.hparams["l2"]), float(ref)) < tol
    assert float(r.hparams["lr"]) == 0.0  # the argmin does not depend on the inner step size


def _f_argmin(ridge: Ridge, l2: float) -> float:
    w, _ = ridge.argmin(l2)
    return float(ridge.outer({"w": w}, {}, ridge.val))


def test_implicit_matches_finite_differences_of_argmin(ridge):
    r = _hg(ridge, bl.Implicit(bl.CG(maxiter=50)), steps=IMPLICIT_STEPS, lr=0.5)
    eps = 1e-6
    fd = (_f_argmin(ridge, L2 + eps) - _f_argmin(ridge, L2 - eps)) / (2 * eps)
    assert _rel(float(r.hparams["l2"]), fd) < 1e-7


def test_implicit_gradcheck_at_converged_solution(ridge):
    def f(l2):
        w = bl.solve(ridge.problem(), ridge.params0(), {"l2": l2}, ridge.train,
                     dynamics=bl.GradientDescent(lr=0.5), steps=IMPLICIT_STEPS, hypergrad=bl.Implicit(bl.Exact()))
        return w["w"]

    assert torch.autograd.gradcheck(f, (ridge.hparams(L2, LR)["l2"],), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("solver", [bl.CG, bl.Neumann, bl.FixedPoint], ids=lambda s: s.__name__)
def test_implicit_error_decreases_with_solver_iterations(ridge, solver):
    _, ref = ridge.argmin(L2)
    errors = []
    inexact = []
    for it in (1, 3, 10, 30):
        s = solver(it, 0.5) if solver is bl.Neumann else solver(it, 0.0)
        with warnings.catch_warnings(record=True) as caught:  # a truncated linear solve must say so
            warnings.simplefilter("always")
            r = _hg(ridge, bl.Implicit(s), steps=IMPLICIT_STEPS, lr=0.5)
        inexact.append(any(issubclass(w.category, bl.hypergrad.InexactHypergradientWarning) for w in caught))
        errors.append(_rel(float(r.hparams["l2"]), float(ref)))
    assert all(b <= a * 1.0000001 for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.05 * errors[0]
    assert inexact[0] and all(inexact[i] for i, e in enumerate(errors) if e > 1e-2), (inexact, errors)


def test_implicit_fixed_point_condition(ridge):
    """The fixed-point condition of one GD step (w = w − η∇L) gives the same hypergradient."""
    eta = 0.5

    def phi(p, h, b):
        loss = Ridge.inner(p, h, b)
        (g,) = torch.autograd.grad(loss, [p["w"]], create_graph=True)
        return {"w": p["w"] - eta * g}

    _, ref = ridge.argmin(L2)
    strat = bl.Implicit(bl.FixedPoint(maxiter=3000, tol=1e-14), condition=bl.fixed_point_condition(phi))
    r = _hg(ridge, strat, steps=IMPLICIT_STEPS, lr=eta)
    assert _rel(float(r.hparams["l2"]), float(ref)) < 1e-8


def test_implicit_with_minibatch_dynamics_needs_condition_batch(ridge):
    n = ridge.X.shape[0]
    batches = lambda t: (ridge.X[(t % 2) * n // 2 : (t % 2 + 1) * n // 2], ridge.y[(t % 2) * n // 2 : (t % 2 + 1) * n // 2])  # noqa: E731
    with pytest.raises(ValueError, match="callable batch"):
        _hg(ridge, bl.Implicit(bl.CG(20)), batch=batches)
    _, ref = ridge.argmin(L2)
    # full-batch condition at a (nearly) converged point: alternate halves, small step
    with pytest.warns(bl.hypergrad.InexactHypergradientWarning, match="Optimality residual .*ABOVE tol"):  # true: a noisy end point
        r = _hg(ridge, bl.Implicit(bl.CG(50), batch=ridge.train), batch=batches, steps=2000, lr=0.05)
    assert _rel(float(r.hparams["l2"]), float(ref)) < 0.05

"""Bad input gets a precise ValueError/TypeError naming the key, shape or step."""
from __future__ import annotations

import pytest
import torch

import bilevel as bl
from ridge_closed_form import Ridge


@pytest.fixture
def ridge(f64) -> Ridge:
    return Ridge.make(dtype=f64)


def _solve(ridge, **kw):
    args = dict(params0=ridge.params0(), hparams=ridge.hparams(), batch=ridge.train)
    args.update({k: kw.pop(k) for k in list(kw) if k in args})
    kw.setdefault("dynamics", bl.GradientDescent(lr=0.1))
    kw.setdefault("steps", 3)
    return bl.solve(ridge.problem(), args["params0"], args["hparams"], args["batch"], **kw)


def test_steps_must_be_positive(ridge):
    with pytest.raises(ValueError, match="steps must be >= 1, got 0"):
        _solve(ridge, steps=0)
    with pytest.raises(TypeError, match="steps must be an int"):
        _solve(ridge, steps=2.0)


def test_unknown_strategy(ridge):
    with pytest.raises(TypeError, match="unknown hypergradient strategy 'reverse'"):
        _solve(ridge, hypergrad="reverse")
    with pytest.raises(TypeError, match=r"e.g. hypergrad=Reverse\(\)"):
        _solve(ridge, hypergrad=bl.Reverse)
    with pytest.raises(TypeError, match="needs an instance, e.g. CG()"):
        bl.Implicit(bl.CG)


def test_params_must_be_dict_of_float_tensors(ridge):
    with pytest.raises(TypeError, match=r"params0\['w'\] must be a torch.Tensor"):
        _solve(ridge, params0={"w": [0.0, 1.0]})
    with pytest.raises(TypeError, match=r"params0\['w'\] must be a floating-point tensor"):
        _solve(ridge, params0={"w": torch.zeros(6, dtype=torch.long)})
    with pytest.raises(ValueError, match="params0 is empty"):
        _solve(ridge, params0={})


def test_learning_rate_dict_keys_and_shapes(ridge):
    with pytest.raises(ValueError, match=r"lr dict has keys that do not match params at step 1: missing \['w'\], unexpected \['v'\]"):
        _solve(ridge, dynamics=bl.GradientDescent(lr={"v": 0.1}))
    with pytest.raises(ValueError, match=r"lr\['w'\] has shape \[4\], which does not broadcast to params\['w'\] of shape \[6\]"):
        _solve(ridge, dynamics=bl.GradientDescent(lr={"w": torch.ones(4, dtype=torch.float64)}))
    with pytest.raises(ValueError, match=r"momentum\['w'\] has shape \[2, 6\]"):
        _solve(ridge, dynamics=bl.HeavyBall(lr=0.1, momentum=lambda h: torch.ones(2, 6, dtype=torch.float64)))
    with pytest.raises(TypeError, match="coefficient function must take"):
        bl.GradientDescent(lr=lambda a, b, c: 0.1)


def test_custom_dynamics_returning_wrong_keys_or_shapes(ridge):
    class Bad(bl.Dynamics):
        def __init__(self, out):
            self.out = out

        def init(self, params, hparams):
            return {"w": params["w"]}

        def step(self, state, grads, hparams, *, t, loss):
            return self.out(state, grads)

    with pytest.raises(ValueError, match=r"params returned by the dynamics at step 1 has keys that do not match params: missing \['w'\], unexpected \['u'\]"):
        _solve(ridge, dynamics=Bad(lambda s, g: {"u": s["w"]}))
    with pytest.raises(ValueError, match=r"params returned by the dynamics\['w'\] at step 1 has shape \[1, 6\], expected \[6\]"):
        _solve(ridge, dynamics=Bad(lambda s, g: {"w": (s["w"] - g["w"])[None]}))
    with pytest.raises(TypeError, match="dynamics must provide init/step/params"):
        _solve(ridge, dynamics=object())


def test_gradient_condition_shape_mismatch(ridge):
    strat = bl.Implicit(bl.CG(5), condition=lambda p, h, b: {"w": p["w"][:3] * h["l2"]})
    # caught by solve(), which evaluates the condition for its optimality certificate
    with pytest.raises(ValueError, match=r"optimality condition.*\['w'\] has shape \[3\], expected \[6\]"):
        _solve(ridge, hypergrad=strat)


@pytest.mark.parametrize("strategy", [bl.Reverse(), bl.Forward(), bl.Implicit(bl.CG(5)), bl.Truncated(1), bl.FirstOrder()], ids=repr)
def test_hparams_that_do_not_require_grad(ridge, strategy):
    hp = {k: v.detach() for k, v in ridge.hparams().items()}
    with pytest.raises(ValueError, match=r"nothing to differentiate: no tensor in hparams \(keys \['l2', 'lr'\]\)"):
        _solve(ridge, hparams=hp, hypergrad=strategy)


def test_implicit_only_params0_requires_grad(ridge):
    hp = {k: v.detach() for k, v in ridge.hparams().items()}
    p0 = {"w": torch.zeros(6, dtype=torch.float64, requires_grad=True)}
    with pytest.raises(ValueError, match="does not depend on\n?.*initialisation"):
        _solve(ridge, hparams=hp, params0=p0, hypergrad=bl.Implicit(bl.CG(5)))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_inner_loss_names_the_step(ridge, bad):
    def inner(p, h, b):
        loss = Ridge.inner(p, h, b)
        return loss * bad if float(p["w"].detach().abs().sum()) > 0 else loss

    prob = bl.BilevelProblem(inner, Ridge.outer)
    with pytest.raises(ValueError, match=r"inner_loss is not finite \((nan|inf)\) at step 2 of 3"):
        bl.solve(prob, ridge.params0(), ridge.hparams(), ridge.train, dynamics=bl.GradientDescent(0.1), steps=3)


def test_diverging_learning_rate_is_caught(ridge):
    with pytest.raises(ValueError, match="inner_loss is not finite .* at step"):
        _solve(ridge, dynamics=bl.GradientDescent(lr=1e6), steps=200)


def test_inner_loss_must_be_scalar(ridge):
    prob = bl.BilevelProblem(lambda p, h, b: p["w"] ** 2, Ridge.outer)
    with pytest.raises(ValueError, match=r"inner_loss must return a scalar tensor, got shape \[6\] at step 1"):
        bl.solve(prob, ridge.params0(), ridge.hparams(), ridge.train, dynamics=bl.GradientDescent(0.1), steps=2)


def test_truncation_longer_than_the_run(ridge):
    with pytest.raises(ValueError, match=r"Truncated\(k=5\) needs k <= steps, got steps=3"):
        _solve(ridge, hypergrad=bl.Truncated(5))
    with pytest.raises(ValueError, match="integer k >= 1"):
        bl.Truncated(0)


def test_forward_and_implicit_refuse_hidden_differentiable_tensors(ridge):
    """Tensors that require grad but are not hparams would silently get no hypergradient."""
    hidden = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)

    def inner(p, h, b):
        return Ridge.inner(p, h, b) + hidden * (p["w"] ** 2).sum()

    prob = bl.BilevelProblem(inner, Ridge.outer)
    for strat in (bl.Forward(), bl.Implicit(bl.CG(5))):
        with pytest.raises(ValueError, match="neither in params\n?.*nor in hparams"):
            bl.solve(prob, ridge.params0(), ridge.hparams(), ridge.train, dynamics=bl.GradientDescent(0.1), steps=2, hypergrad=strat)
    # Reverse handles it through ordinary autograd
    w = bl.solve(prob, ridge.params0(), ridge.hparams(), ridge.train, dynamics=bl.GradientDescent(0.1), steps=2)
    (g,) = torch.autograd.grad(Ridge.outer(w, {}, ridge.val), hidden)
    assert torch.isfinite(g) and float(g) != 0.0

    X = ridge.X.clone().requires_grad_(True)
    with pytest.raises(ValueError, match="batch contains tensors that require grad"):
        _solve(ridge, batch=(X, ridge.y), hypergrad=bl.Forward())


def test_solver_arguments_are_validated():
    with pytest.raises(ValueError, match="CG maxiter must be an integer >= 1"):
        bl.CG(maxiter=0)
    with pytest.raises(ValueError, match="Neumann alpha must be a finite number > 0"):
        bl.Neumann(10, alpha=-1.0)
    with pytest.raises(ValueError, match="FixedPoint tol must be a finite number >= 0"):
        bl.FixedPoint(10, tol=float("nan"))
    with pytest.raises(ValueError, match="Checkpointed"):
        bl.Checkpointed(0)
    with pytest.raises(ValueError, match="chunk_size"):
        bl.Forward(chunk_size=0)


def test_exact_solver_reports_singular_systems(f64):
    """A rank-deficient least-squares inner problem has no unique argmin: Exact() says so."""
    X = torch.ones(5, 2, dtype=f64)  # rank 1
    y = torch.ones(5, dtype=f64)
    prob = bl.BilevelProblem(lambda p, h, b: ((X @ p["w"] - y) ** 2).mean() * h["s"], lambda p, h, b: (p["w"] ** 2).sum())
    s = torch.tensor(1.0, dtype=f64, requires_grad=True)
    w = bl.solve(prob, {"w": torch.zeros(2, dtype=f64)}, {"s": s}, None, dynamics=bl.GradientDescent(0.1), steps=50,
                 hypergrad=bl.Implicit(bl.Exact()))
    with pytest.raises(ValueError, match="singular"):
        prob.outer_loss(w, {}, None).backward()


def test_cg_warns_on_indefinite_systems(f64):
    prob = bl.BilevelProblem(lambda p, h, b: -((p["w"] - h["c"]) ** 2).sum(), lambda p, h, b: p["w"].sum())
    c = torch.ones(3, dtype=f64, requires_grad=True)
    w = bl.solve(prob, {"w": torch.ones(3, dtype=f64)}, {"c": c}, None, dynamics=bl.GradientDescent(0.01), steps=1,
                 hypergrad=bl.Implicit(bl.CG(5)))
    with pytest.warns(RuntimeWarning, match="non-positive curvature"):
        prob.outer_loss(w, {}, None).backward()


def test_forward_mode_explains_torch_mse_loss_limitation(f64):
    """torch 2.14 cannot jvp through F.mse_loss's backward; Forward() says what to do instead."""
    x = torch.ones(4, 2, dtype=f64)
    y = torch.zeros(4, 1, dtype=f64)
    prob = bl.BilevelProblem(lambda p, h, b: torch.nn.functional.mse_loss(x @ p["w"], y) * h["s"], lambda p, h, b: p["w"].sum())
    s = torch.tensor(1.0, dtype=f64, requires_grad=True)
    try:
        bl.solve(prob, {"w": torch.ones(2, 1, dtype=f64)}, {"s": s}, None, dynamics=bl.GradientDescent(0.1), steps=1,
                 hypergrad=bl.Forward())
    except RuntimeError as e:
        assert "((pred - y) ** 2).mean()" in str(e)
    # the elementary form works and agrees with reverse mode
    prob2 = bl.BilevelProblem(lambda p, h, b: ((x @ p["w"] - y) ** 2).mean() * h["s"], lambda p, h, b: p["w"].sum())
    g = [torch.autograd.grad(prob2.outer_loss(bl.solve(prob2, {"w": torch.ones(2, 1, dtype=f64)}, {"s": s}, None,
                                                      dynamics=bl.GradientDescent(0.1), steps=2, hypergrad=st), {}, None), s)[0]
         for st in (bl.Forward(), bl.Reverse())]
    assert torch.allclose(g[0], g[1], rtol=1e-12)

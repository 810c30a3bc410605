"""Dynamics with learned coefficients, mini-batches, continuation and params0 gradients.

Exact strategies must agree with each other (independent mechanisms: reverse-mode autograd,
forward-mode jvp, checkpoint recomputation) and with central finite differences.
"""
from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

import bilevel as bl
from ridge_closed_form import Ridge


@pytest.fixture
def ridge(f64) -> Ridge:
    return Ridge.make(dtype=f64)


def _grads(prob, params0, hparams, batch, val, dyn, steps, strategy):
    w = bl.solve(prob, params0, hparams, batch, dynamics=dyn, steps=steps, hypergrad=strategy)
    inputs = [v for v in list(hparams.values()) + list(params0.values()) if v.requires_grad]
    return torch.autograd.grad(prob.outer_loss(w, hparams, val), inputs)


def _fd(fun, x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Central finite differences of a scalar function of one tensor."""
    g = torch.zeros_like(x)
    flat = g.view(-1)
    for i in range(x.numel()):
        e = torch.zeros_like(x).view(-1)
        e[i] = eps
        e = e.view_as(x)
        flat[i] = (fun(x + e) - fun(x - e)) / (2 * eps)
    return g


EXACT = [bl.Reverse(), bl.Forward(), bl.Checkpointed(2)]


def test_heavy_ball_learning_rate_and_momentum(ridge):
    dyn = bl.HeavyBall(lr=lambda h: h["lr"], momentum=lambda h: h["mu"])
    hp = {"l2": torch.tensor(0.1, dtype=torch.float64), "lr": torch.tensor(0.1, dtype=torch.float64, requires_grad=True),
          "mu": torch.tensor(0.6, dtype=torch.float64, requires_grad=True)}
    outs = [_grads(ridge.problem(), ridge.params0(), hp, ridge.train, ridge.val, dyn, 15, s) for s in EXACT]
    for o in outs[1:]:
        for a, b in zip(outs[0], o):
            assert torch.allclose(a, b, rtol=1e-10)

    def f(lr, mu):
        with torch.no_grad():
            w = bl.solve(ridge.problem(), ridge.params0(), {**hp, "lr": lr, "mu": mu}, ridge.train, dynamics=dyn, steps=15)
            return ridge.outer(w, {}, ridge.val)

    fd_lr = _fd(lambda x: f(x, hp["mu"]), hp["lr"].detach())
    fd_mu = _fd(lambda x: f(hp["lr"], x), hp["mu"].detach())
    assert torch.allclose(outs[0][0], fd_lr, rtol=1e-6)
    assert torch.allclose(outs[0][1], fd_mu, rtol=1e-6)


def test_nesterov_momentum_matches_torch_optim(ridge):
    w0 = torch.randn(ridge.X.shape[1], dtype=torch.float64)
    ref = w0.clone().requires_grad_(True)
    opt = torch.optim.SGD([ref], lr=0.05, momentum=0.9, nesterov=True)
    hp = {"l2": torch.tensor(0.1, dtype=torch.float64)}
    for _ in range(7):
        opt.zero_grad()
        Ridge.inner({"w": ref}, hp, ridge.train).backward()
        opt.step()
    with torch.no_grad():
        w = bl.solve(ridge.problem(), {"w": w0}, hp, ridge.train, dynamics=bl.HeavyBall(0.05, 0.9, nesterov=True), steps=7)
    assert torch.allclose(w["w"], ref.detach(), rtol=1e-12)


def test_meta_sgd_elementwise_step_sizes_and_initialisation(ridge):
    """Meta-SGD: α (one per weight) and w_0 are outer variables; per-step schedule via t."""
    d = ridge.X.shape[1]
    g = torch.Generator().manual_seed(1)
    alpha = (0.05 + 0.1 * torch.rand(d, generator=g, dtype=torch.float64)).requires_grad_(True)
    w0 = torch.randn(d, generator=g, dtype=torch.float64, requires_grad=True)
    dyn = bl.GradientDescent(lr=lambda h: {"w": h["alpha"]})
    hp = {"l2": torch.tensor(0.1, dtype=torch.float64), "alpha": alpha}
    outs = [_grads(ridge.problem(), {"w": w0}, hp, ridge.train, ridge.val, dyn, 5, s) for s in EXACT]
    for o in outs[1:]:
        for a, b in zip(outs[0], o):
            assert torch.allclose(a, b, rtol=1e-10)

    def f(a, w):
        with torch.no_grad():
            wt = bl.solve(ridge.problem(), {"w": w}, {**hp, "alpha": a}, ridge.train, dynamics=dyn, steps=5)
            return ridge.outer(wt, {}, ridge.val)

    assert torch.allclose(outs[0][0], _fd(lambda a: f(a, w0.detach()), alpha.detach()), rtol=1e-6)
    assert torch.allclose(outs[0][1], _fd(lambda w: f(alpha.detach(), w), w0.detach()), rtol=1e-6)


def test_per_step_learning_rate_schedule(ridge):
    steps = 6
    sched = torch.linspace(0.05, 0.3, steps, dtype=torch.float64).requires_grad_(True)
    dyn = bl.GradientDescent(lr=lambda h, t: h["sched"][t - 1])
    hp = {"l2": torch.tensor(0.1, dtype=torch.float64), "sched": sched}
    g_rev, g_fwd = (_grads(ridge.problem(), ridge.params0(), hp, ridge.train, ridge.val, dyn, steps, s)[0]
                    for s in (bl.Reverse(), bl.Forward()))
    assert torch.allclose(g_rev, g_fwd, rtol=1e-10)

    def f(s):
        with torch.no_grad():
            w = bl.solve(ridge.problem(), ridge.params0(), {**hp, "sched": s}, ridge.train, dynamics=dyn, steps=steps)
            return ridge.outer(w, {}, ridge.val)

    assert torch.allclose(g_rev, _fd(f, sched.detach()), rtol=1e-6)


def test_minibatch_callable_matches_manual_unroll(ridge):
    n = ridge.X.shape[0]
    idx = [torch.arange(i * 10, (i + 1) * 10) % n for i in range(8)]
    batch = lambda t: (ridge.X[idx[t - 1]], ridge.y[idx[t - 1]])  # noqa: E731  t = 1..T
    hp = ridge.hparams(0.1, 0.2)
    dyn = bl.GradientDescent(lr=lambda h: h["lr"])
    g_rev = _grads(ridge.problem(), ridge.params0(), hp, batch, ridge.val, dyn, 8, bl.Reverse())
    g_fwd = _grads(ridge.problem(), ridge.params0(), hp, batch, ridge.val, dyn, 8, bl.Forward())
    w = ridge.params0()["w"]
    for t in range(1, 9):
        X, y = batch(t)
        w = w - hp["lr"] * (X.T @ (X @ w - y) / X.shape[0] + hp["l2"] * w)
    g_ref = torch.autograd.grad(ridge.outer({"w": w}, {}, ridge.val), list(hp.values()))
    for a, b, c in zip(g_rev, g_fwd, g_ref):
        assert torch.allclose(a, c, rtol=1e-12)
        assert torch.allclose(b, c, rtol=1e-10)


@pytest.mark.parametrize("strategy", [bl.Reverse(), bl.Forward(), bl.Checkpointed(3), bl.FirstOrder()], ids=repr)
def test_maml_style_initialisation_gradient_through_a_network(gen, f64, strategy):
    """d E / d w_0 through 3 SGD steps of a small MLP, checked against finite differences."""
    net = torch.nn.Sequential(torch.nn.Linear(2, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1)).to(f64)
    x = torch.randn(12, 2, generator=gen, dtype=f64)
    y = torch.sin(x.sum(1, keepdim=True))
    xv = torch.randn(12, 2, generator=gen, dtype=f64)
    yv = torch.sin(xv.sum(1, keepdim=True))

    def loss(p, h, b):
        return ((functional_call(net, p, (b[0],)) - b[1]) ** 2).mean()

    prob = bl.BilevelProblem(loss, loss)
    p0 = {k: v.detach().clone().requires_grad_(True) for k, v in net.named_parameters()}
    dyn = bl.GradientDescent(lr=0.3)
    grads = _grads(prob, p0, {}, (x, y), (xv, yv), dyn, 3, strategy)
    if isinstance(strategy, bl.FirstOrder):
        with torch.no_grad():
            w = bl.solve(prob, p0, {}, (x, y), dynamics=dyn, steps=3)
        w = {k: v.detach().requires_grad_(True) for k, v in w.items()}
        ref = torch.autograd.grad(loss(w, {}, (xv, yv)), list(w.values()))
        for a, b in zip(grads, ref):
            assert torch.allclose(a, b, rtol=1e-12)
        return
    key = "0.weight"

    def f(wk):
        with torch.no_grad():
            wt = bl.solve(prob, {**{k: v.detach() for k, v in p0.items()}, key: wk}, {}, (x, y), dynamics=dyn, steps=3)
            return loss(wt, {}, (xv, yv))

    fd = _fd(f, p0[key].detach())
    assert torch.allclose(grads[0], fd, rtol=1e-6, atol=1e-10)


def test_continuation_truncated_online_and_forward_carry(ridge):
    """Two calls of T/2 steps with return_state equal one call of T steps (Forward carries dZ)."""
    hp = ridge.hparams(0.1, 0.2)
    dyn = bl.HeavyBall(lr=lambda h: h["lr"], momentum=0.5)
    prob = ridge.problem()
    w_full = bl.solve(prob, ridge.params0(), hp, ridge.train, dynamics=dyn, steps=10, hypergrad=bl.Forward())
    g_full = torch.autograd.grad(ridge.outer(w_full, {}, ridge.val), list(hp.values()))

    _, state = bl.solve(prob, ridge.params0(), hp, ridge.train, dynamics=dyn, steps=5, hypergrad=bl.Forward(), return_state=True)
    assert state.t == 5 and state.tangent_keys == ("l2", "lr")
    w2, state2 = bl.solve(prob, state, hp, ridge.train, dynamics=dyn, steps=5, hypergrad=bl.Forward(), return_state=True)
    assert state2.t == 10
    g_two = torch.autograd.grad(ridge.outer(w2, {}, ridge.val), list(hp.values()))
    assert torch.allclose(w2["w"], w_full["w"], rtol=1e-13)
    for a, b in zip(g_two, g_full):
        assert torch.allclose(a, b, rtol=1e-10)

    # Reverse continuation treats the incoming state as a constant: equals Truncated(5) of 10 steps
    w_r = bl.solve(prob, state, hp, ridge.train, dynamics=dyn, steps=5, hypergrad=bl.Reverse())
    g_r = torch.autograd.grad(ridge.outer(w_r, {}, ridge.val), list(hp.values()))
    w_t = bl.solve(prob, ridge.params0(), hp, ridge.train, dynamics=dyn, steps=10, hypergrad=bl.Truncated(5))
    g_t = torch.autograd.grad(ridge.outer(w_t, {}, ridge.val), list(hp.values()))
    for a, b in zip(g_r, g_t):
        assert torch.allclose(a, b, rtol=1e-12)


def test_custom_dynamics_init_step_pair(ridge):
    """A user's own dynamics (preconditioned GD with a learned diagonal) works with every exact strategy."""

    class Preconditioned(bl.Dynamics):
        def init(self, params, hparams):
            return {"w": params["w"]}

        def step(self, state, grads, hparams, *, t, loss):
            return {"w": state["w"] - torch.nn.functional.softplus(hparams["p"]) * grads["w"]}

    d = ridge.X.shape[1]
    hp = {"l2": torch.tensor(0.1, dtype=torch.float64), "p": torch.full((d,), -1.0, dtype=torch.float64, requires_grad=True)}
    outs = [_grads(ridge.problem(), ridge.params0(), hp, ridge.train, ridge.val, Preconditioned(), 6, s)[0] for s in EXACT]
    assert torch.allclose(outs[0], outs[1], rtol=1e-10) and torch.allclose(outs[0], outs[2], rtol=1e-12)


def test_no_grad_inference_runs_every_strategy(ridge):
    with torch.no_grad():
        for s in (bl.Reverse(), bl.Forward(), bl.Implicit(bl.CG(5)), bl.Truncated(2), bl.Checkpointed(2)):
            w = bl.solve(ridge.problem(), ridge.params0(), ridge.hparams(), ridge.train,
                         dynamics=bl.GradientDescent(0.2), steps=4, hypergrad=s)
            assert not w["w"].requires_grad

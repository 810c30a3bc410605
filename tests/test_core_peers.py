"""Reverse-mode meta-gradients against independent implementations: higher and torchopt."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

import bilevel as bl

higher = pytest.importorskip("higher")
torchopt = pytest.importorskip("torchopt")


def _mlp(gen: torch.Generator, dtype: torch.dtype, bn: bool = False) -> nn.Module:
    layers: list[nn.Module] = [nn.Linear(3, 8)]
    if bn:
        layers.append(nn.BatchNorm1d(8))
    layers += [nn.Tanh(), nn.Linear(8, 2)]
    net = nn.Sequential(*layers).to(dtype)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=gen, dtype=dtype))
    return net


def _data(gen, dtype, n=16):
    x = torch.randn(n, 3, generator=gen, dtype=dtype)
    y = torch.randn(n, 2, generator=gen, dtype=dtype)
    return x, y


STEPS, LR, MOM = 4, 0.1, 0.7


def _problem(net: nn.Module, buffers: dict | None = None) -> bl.BilevelProblem:
    def loss(p, h, b):
        x, y = b
        state = {**p, **(buffers or {})}
        return ((functional_call(net, state, (x,)) - y) ** 2).mean()

    return bl.BilevelProblem(loss, loss)


def _ours(net, tr, va, dynamics, hparams=None, buffers=None):
    params0 = dict(net.named_parameters())
    prob = _problem(net, buffers)
    w = bl.solve(prob, params0, hparams or {}, tr, dynamics=dynamics, steps=STEPS, hypergrad=bl.Reverse())
    outer = prob.outer_loss(w, {}, va)
    inputs = list(params0.values()) + list((hparams or {}).values())
    return torch.autograd.grad(outer, inputs)


def _higher(net, tr, va, opt, override=None):
    with higher.innerloop_ctx(net, opt, copy_initial_weights=False, override=override) as (fnet, diffopt):
        for _ in range(STEPS):
            diffopt.step(((fnet(tr[0]) - tr[1]) ** 2).mean())
        outer = ((fnet(va[0]) - va[1]) ** 2).mean()
    extra = list(override["lr"]) if override else []
    return torch.autograd.grad(outer, list(net.parameters()) + extra)


def _assert_all_close(a, b, rtol=1e-10):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.allclose(x, y, rtol=rtol, atol=1e-12), (x - y).abs().max()


def test_reverse_sgd_matches_higher_and_torchopt(gen, f64):
    net = _mlp(gen, f64)
    tr, va = _data(gen, f64), _data(gen, f64)
    ours = _ours(net, tr, va, bl.GradientDescent(lr=LR))
    ref_h = _higher(net, tr, va, torch.optim.SGD(net.parameters(), lr=LR))

    # torchopt functional API: differentiable SGD on a dict of params
    params = dict(net.named_parameters())
    opt = torchopt.sgd(lr=LR)
    state = opt.init(params)
    p = params
    for _ in range(STEPS):
        loss = ((functional_call(net, p, (tr[0],)) - tr[1]) ** 2).mean()
        grads = torch.autograd.grad(loss, list(p.values()), create_graph=True)
        updates, state = opt.update(dict(zip(p, grads)), state, inplace=False)
        p = torchopt.apply_updates(p, updates, inplace=False)
    outer = ((functional_call(net, p, (va[0],)) - va[1]) ** 2).mean()
    ref_t = torch.autograd.grad(outer, list(params.values()))

    _assert_all_close(ours, ref_h)
    _assert_all_close(ours, ref_t)


def test_reverse_momentum_and_learning_rate_hypergradient_match_higher(gen, f64):
    net = _mlp(gen, f64)
    tr, va = _data(gen, f64), _data(gen, f64)
    lr = torch.tensor(LR, dtype=f64, requires_grad=True)
    ours = _ours(net, tr, va, bl.HeavyBall(lr=lambda h: h["lr"], momentum=MOM), hparams={"lr": lr})
    ref = _higher(net, tr, va, torch.optim.SGD(net.parameters(), lr=LR, momentum=MOM), override={"lr": [lr]})
    _assert_all_close(ours, ref)


def test_adam_matches_torch_optim_and_its_hypergradient_is_exact(gen, f64):
    """Adam(eps_root=0) follows torch.optim.Adam exactly; its hypergradients agree across modes.

    Neither peer differentiates torch.optim.Adam's exact update (higher uses the ε-hat form of
    Kingma & Ba's Algorithm 1; torchopt computes the bias correction in float32), so the oracles
    here are torch.optim.Adam's trajectory, forward mode and central finite differences.
    """
    net = _mlp(gen, f64)
    tr, va = _data(gen, f64), _data(gen, f64)
    prob = _problem(net)
    params0 = {k: v.detach().clone() for k, v in net.named_parameters()}

    ref = {k: v.clone().requires_grad_(True) for k, v in params0.items()}
    opt = torch.optim.Adam(list(ref.values()), lr=LR)
    for _ in range(STEPS):
        opt.zero_grad()
        prob.inner_loss(ref, {}, tr).backward()
        opt.step()
    with torch.no_grad():
        w = bl.solve(prob, params0, {}, tr, dynamics=bl.Adam(lr=LR, eps_root=0.0), steps=STEPS)
    for k in w:
        assert torch.allclose(w[k], ref[k].detach(), rtol=1e-12, atol=1e-14)

    def f(lr, b1, strategy=bl.Reverse()):
        dyn = bl.Adam(lr=lambda h: h["lr"], b1=lambda h: h["b1"], eps_root=0.0)
        wt = bl.solve(prob, params0, {"lr": lr, "b1": b1}, tr, dynamics=dyn, steps=STEPS, hypergrad=strategy)
        return prob.outer_loss(wt, {}, va)

    lr = torch.tensor(LR, dtype=f64, requires_grad=True)
    b1 = torch.tensor(0.8, dtype=f64, requires_grad=True)
    g_rev = torch.autograd.grad(f(lr, b1), (lr, b1))
    g_fwd = torch.autograd.grad(f(lr, b1, bl.Forward()), (lr, b1))
    eps = 1e-6
    with torch.no_grad():
        fd = ((f(lr + eps, b1) - f(lr - eps, b1)) / (2 * eps), (f(lr, b1 + eps) - f(lr, b1 - eps)) / (2 * eps))
    for a, b, c in zip(g_rev, g_fwd, fd):
        assert torch.allclose(a, b, rtol=1e-10)
        assert torch.allclose(a, c, rtol=1e-6)


def test_batchnorm_through_functional_call_matches_higher(gen, f64):
    """BatchNorm in train mode uses the batch statistics of each call (documented policy).

    Running statistics are updated in place on the buffer tensors passed to ``functional_call``;
    pass copies (as here) to leave the module untouched. They do not affect train-mode outputs,
    so the meta-gradient equals higher's.
    """
    net = _mlp(gen, f64, bn=True).train()
    tr, va = _data(gen, f64), _data(gen, f64)
    before = {k: b.clone() for k, b in net.named_buffers()}
    buffers = {k: b.clone() for k, b in net.named_buffers()}
    ours = _ours(net, tr, va, bl.GradientDescent(lr=LR), buffers=buffers)
    for k, b in net.named_buffers():
        assert torch.equal(b, before[k]), f"module buffer {k} was modified"
    # STEPS inner calls + 1 outer call update the copied running statistics
    assert int(buffers["1.num_batches_tracked"]) == STEPS + 1
    ref = _higher(net, tr, va, torch.optim.SGD(net.parameters(), lr=LR))
    _assert_all_close(ours, ref)


def test_batchnorm_forward_mode_with_batch_statistics(gen, f64):
    """Forward() runs under vmap: use BatchNorm with track_running_stats=False (pure function)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8, track_running_stats=False), nn.Tanh(), nn.Linear(8, 2)).to(f64)
    tr, va = _data(gen, f64), _data(gen, f64)
    params0 = {k: v.detach() for k, v in net.named_parameters()}
    prob = _problem(net)
    lr = torch.tensor(LR, dtype=f64, requires_grad=True)
    grads = []
    for strat in (bl.Reverse(), bl.Forward()):
        w = bl.solve(prob, params0, {"lr": lr}, tr, dynamics=bl.GradientDescent(lr=lambda h: h["lr"]), steps=STEPS, hypergrad=strat)
        grads.append(torch.autograd.grad(prob.outer_loss(w, {}, va), lr)[0])
    assert torch.allclose(grads[0], grads[1], rtol=1e-10)

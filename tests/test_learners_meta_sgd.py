"""Meta-SGD: the meta-gradient w.r.t. the initialisation θ and the step sizes α."""
from __future__ import annotations

import pytest
import torch

import bilevel as bl
from learners_tasks import directional_fd, dot, grads_of, mlp_forward, random_direction, regression_episodes

from learners.maml import MAML
from learners.meta_sgd import MetaSGD

TINY = {"example_shape": [1], "ways": None, "backbone": "mlp", "backbone_options": {"hidden": [4]}}


def _learner(gen: torch.Generator, f64: torch.dtype, **kw) -> MetaSGD:
    torch.manual_seed(0)
    m = MetaSGD(**TINY, **kw).to(f64)
    with torch.no_grad():  # α away from the constant init so that its gradient is not trivially symmetric
        for a in m.alpha.values():
            a.copy_(0.05 + 0.1 * torch.rand(a.shape, generator=gen, dtype=f64))
    return m


def _manual_meta_loss(m: MetaSGD, ep, steps: int, first_order: bool) -> torch.Tensor:
    """Independent unroll: w_t = w_{t−1} − α ⊙ ∇L(w_{t−1}) with torch.autograd by hand."""
    theta = dict(m.net.named_parameters())
    alpha = {k: m.alpha[k.replace(".", "-")] for k in theta}
    losses = []
    for j in range(ep.support_x.shape[0]):
        w = dict(theta)
        for _ in range(steps):
            inner = ((mlp_forward(w, ep.support_x[j]) - ep.support_y[j]) ** 2).mean()
            g = torch.autograd.grad(inner, list(w.values()), create_graph=not first_order)
            w = {k: v - alpha[k] * gk for (k, v), gk in zip(w.items(), g)}
        losses.append(((mlp_forward(w, ep.query_x[j]) - ep.query_y[j]) ** 2).mean())
    return torch.stack(losses).mean()


@pytest.mark.parametrize("hypergrad", [bl.Reverse(), bl.FirstOrder()], ids=["reverse", "first-order"])
def test_meta_gradient_matches_manual_unroll(gen: torch.Generator, f64: torch.dtype, hypergrad: bl.Strategy) -> None:
    ep = regression_episodes(gen, f64)
    m = _learner(gen, f64, inner_steps=2, hypergrad=hypergrad)
    loss, _ = m.meta_loss(ep)
    ref = _manual_meta_loss(m, ep, 2, first_order=hypergrad == bl.FirstOrder())
    assert loss.item() == pytest.approx(ref.item(), rel=1e-12)
    got, want = grads_of(loss, m), grads_of(ref, m)
    assert set(got) == {k for k, _ in m.named_parameters()} and any(k.startswith("alpha.") for k in got)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-10, atol=1e-12, msg=k)
    assert all(float(g.abs().max()) > 0 for k, g in got.items() if k.startswith("alpha."))


def test_meta_gradient_matches_finite_differences(gen: torch.Generator, f64: torch.dtype) -> None:
    ep = regression_episodes(gen, f64)
    m = _learner(gen, f64, inner_steps=3)
    direction = random_direction(m, gen)
    analytic = dot(grads_of(m.meta_loss(ep)[0], m), direction)
    numeric = directional_fd(lambda: m.meta_loss(ep)[0], m, direction)
    assert analytic == pytest.approx(numeric, rel=1e-6)
    alpha_only = {k: v for k, v in direction.items() if k.startswith("alpha.")}
    analytic_alpha = dot(grads_of(m.meta_loss(ep)[0], m), alpha_only)
    assert analytic_alpha == pytest.approx(directional_fd(lambda: m.meta_loss(ep)[0], m, alpha_only), rel=1e-6)


def test_one_step_first_order_closed_form(gen: torch.Generator, f64: torch.dtype) -> None:
    """T = 1, first order: dE/dα = −g ⊙ ∇E(w_1) and dE/dθ = ∇E(w_1) with g = ∇L(θ)."""
    ep = regression_episodes(gen, f64, b=1)
    m = _learner(gen, f64, inner_steps=1, hypergrad=bl.FirstOrder())
    got = grads_of(m.meta_loss(ep)[0], m)
    theta = {k: v.detach().requires_grad_(True) for k, v in m.net.named_parameters()}
    g = torch.autograd.grad(((mlp_forward(theta, ep.support_x[0]) - ep.support_y[0]) ** 2).mean(), list(theta.values()))
    w1 = {k: (v - m.alpha[k.replace(".", "-")].detach() * gk).detach().requires_grad_(True) for (k, v), gk in zip(theta.items(), g)}
    e_grad = torch.autograd.grad(((mlp_forward(w1, ep.query_x[0]) - ep.query_y[0]) ** 2).mean(), list(w1.values()))
    for (k, _), gk, ek in zip(theta.items(), g, e_grad):
        torch.testing.assert_close(got["net." + k], ek, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(got["alpha." + k.replace(".", "-")], -gk * ek, rtol=1e-12, atol=1e-14)


def test_constant_alpha_is_maml(gen: torch.Generator, f64: torch.dtype) -> None:
    ep = regression_episodes(gen, f64)
    torch.manual_seed(3)
    sgd = MetaSGD(**TINY, inner_lr=0.07, inner_steps=2).to(f64)
    torch.manual_seed(3)
    maml = MAML(**TINY, inner_lr=0.07, inner_steps=2).to(f64)
    assert {k: v.shape for k, v in sgd.alpha.items()} == {k.replace(".", "-"): v.shape for k, v in sgd.net.named_parameters()}
    assert all(bool((a == torch.tensor(0.07).to(f64)).all()) for a in sgd.alpha.values())  # float32 init
    with torch.no_grad():  # the exact double 0.07 that MAML uses
        for a in sgd.alpha.values():
            a.fill_(0.07)
    l_sgd, l_maml = sgd.meta_loss(ep)[0], maml.meta_loss(ep)[0]
    assert l_sgd.item() == pytest.approx(l_maml.item(), rel=1e-14)
    g_sgd, g_maml = grads_of(l_sgd, sgd.net), grads_of(l_maml, maml.net)
    for k in g_maml:
        torch.testing.assert_close(g_sgd[k], g_maml[k], rtol=1e-12, atol=1e-14)

"""Meta-Curvature: the mode products, identity = MAML, and the matrices' meta-gradient."""
from __future__ import annotations

import pytest
import torch

import bilevel as bl
from learners_tasks import directional_fd, dot, grads_of, image_episodes, random_direction

from learners.maml import MAML
from learners.meta_curvature import MetaCurvature, curvature_factors, curvature_transform

CONV = {"example_shape": [1, 16, 16], "ways": 2, "backbone": "conv4", "backbone_options": {"filters": 2}}


def test_mode_products_match_einsum(gen: torch.Generator, f64: torch.dtype) -> None:
    g = torch.randn(3, 2, 3, 3, generator=gen, dtype=f64)
    m = {x: torch.randn(n, n, generator=gen, dtype=f64) for x, n in curvature_factors(g.shape).items()}
    assert {x: v.shape[0] for x, v in m.items()} == {"o": 3, "i": 2, "f": 9}
    want = torch.einsum("oif,Oo,Ii,Ff->OIF", g.reshape(3, 2, 9), m["o"], m["i"], m["f"]).reshape(g.shape)
    torch.testing.assert_close(curvature_transform(g, m), want, rtol=1e-12, atol=1e-12)
    # the mode-1 product alone on entry (0, 1, 2, 0): Σ_o' M_o[0, o'] g[o', 1, 2, 0]
    eye = {"i": torch.eye(2, dtype=f64), "f": torch.eye(9, dtype=f64)}
    out = curvature_transform(g, {**eye, "o": m["o"]})
    assert float(out[0, 1, 2, 0]) == pytest.approx(float((m["o"][0] * g[:, 1, 2, 0]).sum()), rel=1e-12)
    lin = torch.randn(4, 5, generator=gen, dtype=f64)
    mo, mi = torch.randn(4, 4, generator=gen, dtype=f64), torch.randn(5, 5, generator=gen, dtype=f64)
    torch.testing.assert_close(curvature_transform(lin, {"o": mo, "i": mi}), mo @ lin @ mi.T, rtol=1e-12, atol=1e-12)
    vec, mb = torch.randn(4, generator=gen, dtype=f64), torch.randn(4, 4, generator=gen, dtype=f64)
    torch.testing.assert_close(curvature_transform(vec, {"b": mb}), mb @ vec, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match=r"shape \[2, 2, 2\]"):
        curvature_factors((2, 2, 2))


@pytest.mark.parametrize("hypergrad", [bl.Reverse(), bl.FirstOrder()], ids=["reverse", "first-order"])
def test_identity_matrices_reproduce_maml(gen: torch.Generator, f64: torch.dtype, hypergrad: str) -> None:
    ep = image_episodes(gen, f64)
    torch.manual_seed(1)
    mc = MetaCurvature(**CONV, inner_steps=2, inner_lr=0.3, hypergrad=hypergrad).to(f64)
    torch.manual_seed(1)
    maml = MAML(**CONV, inner_steps=2, inner_lr=0.3, hypergrad=hypergrad).to(f64)
    shapes = {k: {x: tuple(m.shape) for x, m in d.items()} for k, d in mc.curvature.items()}
    assert shapes["convs-1-weight"] == {"o": (2, 2), "i": (2, 2), "f": (9, 9)}
    assert shapes["head-weight"] == {"o": (2, 2), "i": (2, 2)} and shapes["norms-0-bias"] == {"b": (2, 2)}
    l_mc, l_maml = mc.meta_loss(ep)[0], maml.meta_loss(ep)[0]
    assert l_mc.item() == pytest.approx(l_maml.item(), rel=1e-13)
    g_mc, g_maml = grads_of(l_mc, mc), grads_of(l_maml, maml)
    for k, v in g_maml.items():
        torch.testing.assert_close(g_mc[k], v, rtol=1e-10, atol=1e-13)
    assert all(float(g_mc[k].abs().max()) > 0 for k in g_mc if k.startswith("curvature.") and "convs-3" in k)


def _perturbed(gen: torch.Generator, f64: torch.dtype, **kw) -> MetaCurvature:
    torch.manual_seed(2)
    mc = MetaCurvature(**CONV, inner_lr=0.3, **kw).to(f64)
    with torch.no_grad():
        for d in mc.curvature.values():
            for m in d.values():
                m.add_(0.2 * torch.randn(m.shape, generator=gen, dtype=f64))
    return mc


def test_matrix_gradient_matches_finite_differences(gen: torch.Generator, f64: torch.dtype) -> None:
    ep = image_episodes(gen, f64)
    mc = _perturbed(gen, f64, inner_steps=2)
    direction = {k: v for k, v in random_direction(mc, gen).items() if k.startswith("curvature.")}
    analytic = dot(grads_of(mc.meta_loss(ep)[0], mc), direction)
    numeric = directional_fd(lambda: mc.meta_loss(ep)[0], mc, direction)
    assert analytic == pytest.approx(numeric, rel=1e-6)


def test_one_step_matrix_gradient_closed_form(gen: torch.Generator, f64: torch.dtype) -> None:
    """T = 1, first order: w_1 = θ − α M_o G M_iᵀ for the head, so dE/dM_o = −α (∇E(w_1)) (G M_iᵀ)ᵀ."""
    ep = image_episodes(gen, f64, b=1)
    mc = _perturbed(gen, f64, inner_steps=1, hypergrad=bl.FirstOrder())
    got = grads_of(mc.meta_loss(ep)[0], mc)
    theta = {k: v.detach().requires_grad_(True) for k, v in mc.net.named_parameters()}
    ce = torch.nn.functional.cross_entropy
    g = dict(zip(theta, torch.autograd.grad(ce(torch.func.functional_call(mc.net, theta, (ep.support_x[0],)), ep.support_y[0]),
                                            list(theta.values()))))
    hp = {k: v.detach() for k, v in mc.hparams().items()}
    w1 = {k: (v - 0.3 * curvature_transform(g[k], {x: hp[f"{k}.M_{x}"] for x in curvature_factors(v.shape)})).detach().requires_grad_(True)
          for k, v in theta.items()}
    e = dict(zip(w1, torch.autograd.grad(ce(torch.func.functional_call(mc.net, w1, (ep.query_x[0],)), ep.query_y[0]), list(w1.values()))))
    m_i = hp["head.weight.M_i"]
    torch.testing.assert_close(got["curvature.head-weight.o"], -0.3 * e["head.weight"] @ (g["head.weight"] @ m_i.T).T, rtol=1e-10, atol=1e-13)
    m_o = hp["head.weight.M_o"]
    torch.testing.assert_close(got["curvature.head-weight.i"], -0.3 * (m_o.T @ e["head.weight"]).T @ g["head.weight"], rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(got["curvature.head-bias.b"], -0.3 * torch.outer(e["head.bias"], g["head.bias"]), rtol=1e-10, atol=1e-13)

"""Float64 checks of every oracle product against explicit matrices.

On the simulated quadratic the per-batch Hessians are explicit: G_B(z, x) = ½ zᵀA_B z + ½ xᵀB_B x +
xᵀC_B z + a_Bᵀz + b_Bᵀx with A_B = mean u_i u_iᵀ, C_B = mean c_i e_iᵀ. On the L2-regularised
logistic regression the Hessian is Aᵀ diag(σ(1−σ)) A / n + diag(eˣ) and ∇²_xz G = diag(eˣ ⊙ z); its
value-function gradient (the benchmark metric) is checked against finite differences of h.
"""
from __future__ import annotations

import pytest
import torch

from bilevel.stochastic import AutogradOracles, l2_logistic, simulated_quadratic


@pytest.fixture(scope="module")
def quad():
    return simulated_quadratic(n_inner=64, n_outer=64, dim_inner=7, dim_outer=4, seed=1, dtype=torch.float64)


def _mats(d, batch):
    n = d["u"][batch].shape[0]
    return {"A": d["u"][batch].T @ d["u"][batch] / n, "B": d["p"][batch].T @ d["p"][batch] / n,
            "C": d["c"][batch].T @ d["e"][batch] / n, "a": d["a"][batch].mean(0), "b": d["b"][batch].mean(0)}


def test_quadratic_oracles_match_explicit_matrices(quad, f64):
    g = torch.Generator().manual_seed(0)
    z = {"z": torch.randn(7, generator=g, dtype=f64)}
    x = {"x": torch.randn(4, generator=g, dtype=f64)}
    v = {"z": torch.randn(7, generator=g, dtype=f64)}
    u = {"x": torch.randn(4, generator=g, dtype=f64)}
    o = AutogradOracles(quad.problem)
    batch = slice(8, 24)
    mi, mo = _mats(quad.info["data_inner"], batch), _mats(quad.info["data_outer"], batch)
    gz_ref = mi["A"] @ z["z"] + mi["C"].T @ x["x"] + mi["a"]
    gx_ref = mi["B"] @ x["x"] + mi["C"] @ z["z"] + mi["b"]
    gz, hv, cv = o.hvp_cross(z, x, v, batch)
    torch.testing.assert_close(gz["z"], gz_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(hv["z"], mi["A"] @ v["z"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(cv["x"], mi["C"] @ v["z"], rtol=1e-12, atol=1e-12)  # ∇²_xz G v
    torch.testing.assert_close(o.inner_grad(z, x, batch)["z"], gz_ref, rtol=1e-12, atol=1e-12)
    gzb, gxb = o.inner_grad_both(z, x, batch)
    torch.testing.assert_close(gxb["x"], gx_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(o.hvp(z, x, v, batch)["z"], mi["A"] @ v["z"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(o.cross_vjp(z, x, v, batch)["x"], mi["C"] @ v["z"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(o.cross_jvp(z, x, u, batch)["z"], mi["C"].T @ u["x"], rtol=1e-12, atol=1e-12)  # ∇²_zx G u
    fz, fx = o.outer_grads(z, x, batch)
    torch.testing.assert_close(fz["z"], mo["A"] @ z["z"] + mo["C"].T @ x["x"] + mo["a"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fx["x"], mo["B"] @ x["x"] + mo["C"] @ z["z"] + mo["b"], rtol=1e-12, atol=1e-12)


def test_quadratic_closed_form_gradient_matches_finite_differences(quad, f64):
    """∇h from the closed form vs central differences of h(x) = F(z*(x), x) on the full data."""
    info = quad.info
    mi = info["means_inner"]
    x = torch.randn(4, generator=torch.Generator().manual_seed(2), dtype=f64)
    full = slice(0, quad.n_outer)

    def h(xx):
        zs = -torch.linalg.solve(mi["Hz"], mi["a"] + mi["C"].T @ xx)
        return float(quad.problem.outer_loss({"z": zs}, {"x": xx}, full))

    eps = 1e-5
    fd = torch.tensor([(h(x + eps * e) - h(x - eps * e)) / (2 * eps) for e in torch.eye(4, dtype=f64)], dtype=f64)
    grad = info["M"] @ x + info["q"]
    torch.testing.assert_close(grad, fd, rtol=1e-7, atol=1e-8)
    assert abs(quad.metric({"z": torch.zeros(7, dtype=f64)}, {"x": x})["value"] - float(grad @ grad)) < 1e-10


@pytest.fixture(scope="module")
def logistic():
    return l2_logistic(dataset="digits", n_inner=300, n_outer=300, seed=0, dtype=torch.float64)


def test_logistic_oracles_match_explicit_hessian(logistic, f64):
    a, y, _, _ = logistic.info["data"]
    d = a.shape[1]
    g = torch.Generator().manual_seed(0)
    z = {"z": 0.1 * torch.randn(d, generator=g, dtype=f64)}
    x = {"x": torch.randn(d, generator=g, dtype=f64)}
    v = {"z": torch.randn(d, generator=g, dtype=f64)}
    u = {"x": torch.randn(d, generator=g, dtype=f64)}
    batch = slice(10, 74)
    ab, yb = a[batch], y[batch]
    s = torch.sigmoid(yb * (ab @ z["z"]))
    hess = (ab.T * (s * (1 - s))) @ ab / len(yb) + torch.diag(x["x"].exp())
    cross = torch.diag(x["x"].exp() * z["z"])  # ∇²_xz G
    o = AutogradOracles(logistic.problem)
    gz, hv, cv = o.hvp_cross(z, x, v, batch)
    torch.testing.assert_close(gz["z"], ab.T @ (-(1 - s) * yb) / len(yb) + x["x"].exp() * z["z"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(hv["z"], hess @ v["z"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(cv["x"], cross @ v["z"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(o.cross_jvp(z, x, u, batch)["z"], cross.T @ u["x"], rtol=1e-12, atol=1e-12)
    gx = o.inner_grad_both(z, x, batch)[1]["x"]
    torch.testing.assert_close(gx, 0.5 * x["x"].exp() * z["z"] ** 2, rtol=1e-12, atol=1e-14)


def test_logistic_metric_gradient_matches_finite_differences(logistic, f64):
    """The benchmark metric ‖∇h‖² (Newton + direct implicit solve) vs central differences of h."""
    from bilevel.stochastic.problems import _logistic_argmin

    a_tr, y_tr, a_val, y_val = logistic.info["data"]
    d = a_tr.shape[1]
    x = torch.full((d,), -1.0, dtype=f64) + 0.3 * torch.randn(d, generator=torch.Generator().manual_seed(1), dtype=f64)
    z0 = torch.zeros(d, dtype=f64)

    def h(xx):
        zs = _logistic_argmin(a_tr, y_tr, xx, z0)
        return torch.nn.functional.softplus(-y_val * (a_val @ zs)).mean()

    eps = 1e-5
    idx = [0, 5, d // 2, d - 1]
    fd = torch.stack([(h(x + eps * torch.eye(d, dtype=f64)[j]) - h(x - eps * torch.eye(d, dtype=f64)[j])) / (2 * eps) for j in idx])
    # full gradient from the metric's formula, recomputed here to compare entries
    zs = _logistic_argmin(a_tr, y_tr, x, z0)
    s = torch.sigmoid(y_tr * (a_tr @ zs))
    hess = (a_tr.T * (s * (1 - s))) @ a_tr / len(y_tr) + torch.diag(x.exp())
    sv = torch.sigmoid(y_val * (a_val @ zs))
    fz = a_val.T @ (-(1 - sv) * y_val) / len(y_val)
    grad = x.exp() * zs * (-torch.linalg.solve(hess, fz))
    torch.testing.assert_close(grad[idx], fd, rtol=1e-5, atol=1e-9)
    m = logistic.metric({"z": z0}, {"x": x})
    assert abs(m["value"] - float(grad @ grad)) <= 1e-9 * float(grad @ grad)

"""iMAML: the implicit meta-gradient (I + H/λ)⁻¹ ∇E(φ*) against its closed form on linear regression."""
from __future__ import annotations

import json
import warnings

import pytest
import torch
from click.testing import CliRunner
from learners_tasks import directional_fd, dot, grads_of, random_direction

import bilevel as bl
from bilevel.cli import main
from bilevel.data.sampler import Episodes
from bilevel.hypergrad import InexactHypergradientWarning, from_string
from bilevel.options import OptionError
from learners.imaml import IMAML

D = 3  # linear regression y = x·w + b on 3 features: the inner loss is quadratic
LINEAR = {"example_shape": [D], "ways": None, "backbone": "mlp", "backbone_options": {"hidden": []}}


def _linear_episodes(gen: torch.Generator, dtype: torch.dtype, b: int = 3, k: int = 5, q: int = 4) -> Episodes:
    w = torch.randn(b, D, 1, generator=gen, dtype=dtype)
    xs, xq = (torch.randn(b, n, D, generator=gen, dtype=dtype) for n in (k, q))
    noise = lambda n: 0.1 * torch.randn(b, n, 1, generator=gen, dtype=dtype)  # noqa: E731
    return Episodes(xs, xs @ w + noise(k), xq, xq @ w + noise(q))


def _learner(f64: torch.dtype, **kw) -> IMAML:
    torch.manual_seed(0)
    return IMAML(**{**LINEAR, **kw}).to(f64)


def _closed_form(m: IMAML, ep: Episodes) -> tuple[torch.Tensor, torch.Tensor]:
    """(meta-loss, meta-gradient w.r.t. θ = [w; b]) from the normal equations, per task:
    φ* = (H + λI)⁻¹(2/n X̃ᵀy + λθ), H = 2/n X̃ᵀX̃, gradient λ(H + λI)⁻¹ ∇E(φ*) (Lemma 1)."""
    lam = m.config.lam
    theta = torch.cat([m.net.net[0].weight.detach().reshape(-1), m.net.net[0].bias.detach()])
    losses, grads = [], []
    for j in range(ep.support_x.shape[0]):
        xs = torch.cat([ep.support_x[j], torch.ones_like(ep.support_x[j][:, :1])], 1)
        xq = torch.cat([ep.query_x[j], torch.ones_like(ep.query_x[j][:, :1])], 1)
        n, q = xs.shape[0], xq.shape[0]
        h = 2 / n * xs.T @ xs
        a = h + lam * torch.eye(D + 1, dtype=h.dtype)
        phi = torch.linalg.solve(a, 2 / n * xs.T @ ep.support_y[j][:, 0] + lam * theta)
        r = xq @ phi - ep.query_y[j][:, 0]
        losses.append((r ** 2).mean())
        grads.append(lam * torch.linalg.solve(a, 2 / q * xq.T @ r))
    return torch.stack(losses).mean(), torch.stack(grads).mean(0)


def _flat(g: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([g["net.net.0.weight"].reshape(-1), g["net.net.0.bias"]])


@pytest.mark.parametrize("hypergrad", ["implicit-cg:20", "implicit-exact", "reverse", "checkpointed:30"])
@pytest.mark.parametrize("batch_tasks", ["always", "never"])
def test_meta_gradient_is_the_closed_form(gen, f64, hypergrad, batch_tasks) -> None:
    """Converged inner solve (300 GD steps): implicit and unrolled strategies give (I + H/λ)⁻¹∇E(φ*)."""
    ep = _linear_episodes(gen, f64)
    m = _learner(f64, inner_steps=300, inner_lr=0.1, lam=1.5, hypergrad=from_string(hypergrad), batch_tasks=batch_tasks)
    loss, _ = m.meta_loss(ep)
    want_loss, want_grad = _closed_form(m, ep)
    assert loss.item() == pytest.approx(want_loss.item(), rel=1e-10)
    got = _flat(grads_of(loss, m))
    torch.testing.assert_close(got, want_grad, rtol=1e-8, atol=1e-12)
    # not MAML's gradient: the proximal pull and the curvature matter
    maml_like = _flat(grads_of(_unrolled_maml_loss(m, ep), m))
    assert float((got - maml_like).norm() / got.norm()) > 1e-2


def _unrolled_maml_loss(m: IMAML, ep: Episodes) -> torch.Tensor:
    """MAML's meta-loss with the same steps (no proximal term): a different meta-gradient."""
    losses = []
    for j in range(ep.support_x.shape[0]):
        w = dict(m.net.named_parameters())
        for _ in range(3):
            inner = ((torch.func.functional_call(m.net, w, (ep.support_x[j],)) - ep.support_y[j]) ** 2).mean()
            g = torch.autograd.grad(inner, list(w.values()), create_graph=True)
            w = {k: v - 0.1 * gk for (k, v), gk in zip(w.items(), g)}
        losses.append(((torch.func.functional_call(m.net, w, (ep.query_x[j],)) - ep.query_y[j]) ** 2).mean())
    return torch.stack(losses).mean()


def test_meta_gradient_matches_finite_differences(gen, f64) -> None:
    """Through a nonlinear network (tanh MLP, smooth: the inner problem converges), d meta-loss/dθ by
    central differences of the converged meta-loss."""
    ep = _linear_episodes(gen, f64, b=2)
    m = _learner(f64, backbone_options={"hidden": [4], "activation": "tanh"}, inner_steps=400, inner_lr=0.1, lam=2.0,
                 hypergrad=bl.Implicit(bl.CG(maxiter=30)))
    direction = random_direction(m, gen)
    analytic = dot(grads_of(m.meta_loss(ep)[0], m), direction)
    numeric = directional_fd(lambda: m.meta_loss(ep)[0], m, direction, eps=1e-5)
    assert analytic == pytest.approx(numeric, rel=1e-6)


def test_default_inner_solve_converges_on_a_well_conditioned_problem(gen, f64) -> None:
    """The defaults (λ = 2, α = 0.1, T = 35): ‖∇G(φ_T)‖ ≤ 10⁻³‖∇G(θ)‖ when α(λ + ‖H‖) < 2, and the
    implicit certificate does not warn."""
    ep = _linear_episodes(gen, f64, b=2)
    m = _learner(f64)
    c = m.config
    assert (c.lam, c.inner_lr, c.inner_steps, c.inner_optimizer) == (2.0, 0.1, 35, "gd")
    assert m.strategy == bl.Implicit(bl.CG(maxiter=20))
    theta = {k: v.detach() for k, v in m.net.named_parameters()}
    batch = (ep.support_x[0], ep.support_y[0])

    def grad_norm(phi: dict[str, torch.Tensor]) -> float:
        phi = {k: v.detach().requires_grad_(True) for k, v in phi.items()}
        g = torch.autograd.grad(m.task_loss(phi, theta, batch), list(phi.values()))
        return float(sum((x ** 2).sum() for x in g).sqrt())

    with torch.no_grad():
        phi = m.adapt(*batch, c.inner_steps)
    assert grad_norm(phi) <= 1e-3 * grad_norm(theta)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        grads_of(m.meta_loss(ep)[0], m)


def test_memory_does_not_depend_on_the_inner_steps(gen, f64) -> None:
    """The implicit path records no inner step: the autograd graph of the meta-loss has the same
    size for T = 5 and T = 50, while the unrolled check path (reverse) grows with T."""
    ep = _linear_episodes(gen, f64, b=1)

    def graph_size(steps: int, hypergrad: bl.Strategy) -> int:
        loss = _learner(f64, inner_steps=steps, batch_tasks="never", hypergrad=hypergrad).meta_loss(ep)[0]
        seen, todo = set(), [loss.grad_fn]
        while todo:
            fn = todo.pop()
            if fn is None or fn in seen:
                continue
            seen.add(fn)
            todo.extend(f for f, _ in fn.next_functions)
        return len(seen)

    implicit = bl.Implicit(bl.CG(maxiter=20))
    assert graph_size(5, implicit) == graph_size(50, implicit)
    assert graph_size(50, bl.Reverse()) > 5 * graph_size(5, bl.Reverse())


@pytest.mark.parametrize(("hypergrad", "match"), [
    ("first-order", "proximal pull"), ("truncated:2", "implicit-neumann"), ("no-inner", "no meta-gradient"),
    ("forward", "one tangent per weight"),
])
def test_non_implicit_strategies_are_refused_with_the_reason(hypergrad, match) -> None:
    with pytest.raises(OptionError, match=match):
        IMAML(**LINEAR, hypergrad=from_string(hypergrad))


def test_adam_inner_solver_and_params(gen, f64) -> None:
    """θ is the hparams (keyed by parameter name) and φ_0 its constant copy; adam reaches the same φ*."""
    ep = _linear_episodes(gen, f64, b=1)
    m = _learner(f64, inner_optimizer="adam", inner_lr=0.05, inner_steps=600)
    assert set(m.hparams()) == {k for k, _ in m.net.named_parameters()}
    assert all(not v.requires_grad for v in m.initial_params().values())
    assert isinstance(m.dynamics(), bl.Adam)
    loss, _ = m.meta_loss(ep)
    want_loss, want_grad = _closed_form(m, ep)
    assert loss.item() == pytest.approx(want_loss.item(), rel=1e-6)
    torch.testing.assert_close(_flat(grads_of(loss, m)), want_grad, rtol=1e-5, atol=1e-8)


# CG's negative-curvature warning, per task and as the training loop repeats it ("meta-iteration k: CG: ...")
@pytest.mark.filterwarnings("ignore:(meta-iteration .*)?CG. non-positive curvature:RuntimeWarning")
def test_cli_trains_on_the_sinusoid_and_the_model_predicts(tmp_path) -> None:
    """5 inner steps of size 0.01 do not solve the proximal problem of a ReLU network on a sinusoid: the
    training loop says so (once) and log.csv records the residuals. (Whether CG also meets negative
    curvature of the unsolved problem depends on the CPU's rounding; that true warning is not asserted.)"""
    out = tmp_path / "run"
    with pytest.warns(InexactHypergradientWarning, match="Optimality residual"):
        r = CliRunner().invoke(main, ["imaml", "train", "--dataset", "sinusoid", "--shots", "5", "--queries", "5",
                                      "--meta-batch", "2", "--iterations", "3", "--val-every", "3", "--val-episodes", "2",
                                      "--test-episodes", "3", "--inner-lr", "0.01", "--inner-steps", "5", "--lam", "2",
                                      "--hypergrad", "implicit-cg:5", "--no-progress", "--no-tensorboard",
                                      "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert json.loads((out / "metrics.json").read_text())["test"]["episodes"] == 3
    row = (out / "log.csv").read_text().splitlines()[1].split(",")
    assert 1e-3 < float(row[7]) < 10  # the optimality residual of the 5-step inner solve
    model = bl.load(out / "model.pt")
    assert model.learner.config.lam == 2.0 and model.learner.strategy == bl.Implicit(bl.CG(maxiter=5))
    x = torch.linspace(-5, 5, 8)[:, None]
    assert model.predict(x[:5], torch.sin(x[:5]), x[5:]).shape == (3, 1)
    r = CliRunner().invoke(main, ["imaml", "train", "--dataset", "sinusoid", "--hypergrad", "first-order",
                                  "--out", str(tmp_path / "bad")])
    assert r.exit_code == 2 and "implicit-cg:K (the method)" in r.output

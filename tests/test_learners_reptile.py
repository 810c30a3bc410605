"""Reptile: the meta-"gradient" θ − φ_T against its closed form on linear regression, and the paper's update."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from learners_tasks import grads_of, image_episodes

import bilevel as bl
from bilevel.cli import main
from bilevel.data.sampler import Episodes
from learners.maml import MAML
from learners.reptile import Reptile

D = 3
LINEAR = {"example_shape": [D], "ways": None, "backbone": "mlp", "backbone_options": {"hidden": []}}


def _linear_episodes(gen: torch.Generator, dtype: torch.dtype, b: int = 3, k: int = 4, q: int = 3) -> Episodes:
    w = torch.randn(b, D, 1, generator=gen, dtype=dtype)
    xs, xq = (torch.randn(b, n, D, generator=gen, dtype=dtype) for n in (k, q))
    return Episodes(xs, xs @ w, xq, xq @ w + 0.1)


def _learner(f64: torch.dtype, **kw) -> Reptile:
    torch.manual_seed(0)
    return Reptile(**{**LINEAR, **kw}).to(f64)


def _theta(m: Reptile) -> torch.Tensor:
    return torch.cat([m.net.net[0].weight.detach().reshape(-1), m.net.net[0].bias.detach()])


def _closed_form_phi(theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float) -> torch.Tensor:
    """T GD steps on the mean squared error of a linear model: φ_T = (I − αH)^T θ + Σ_{s<T}(I − αH)^s αc."""
    xt = torch.cat([x, torch.ones_like(x[:, :1])], 1)
    n = xt.shape[0]
    h, c = 2 / n * xt.T @ xt, 2 / n * xt.T @ y[:, 0]
    step = torch.eye(D + 1, dtype=x.dtype) - lr * h
    return torch.linalg.matrix_power(step, steps) @ theta + sum(torch.linalg.matrix_power(step, s) for s in range(steps)) @ (lr * c)


@pytest.mark.parametrize("inner_set", ["support+query", "support"])
@pytest.mark.parametrize("batch_tasks", ["always", "never"])
def test_meta_gradient_is_theta_minus_the_adapted_weights(gen, f64, inner_set, batch_tasks) -> None:
    ep = _linear_episodes(gen, f64)
    m = _learner(f64, inner_steps=4, inner_lr=0.05, inner_set=inner_set, batch_tasks=batch_tasks)
    loss, metric = m.meta_loss(ep)
    theta = _theta(m)
    phis = []
    for j in range(3):
        x, y = ep.support_x[j], ep.support_y[j]
        if inner_set == "support+query":
            x, y = torch.cat([x, ep.query_x[j]]), torch.cat([y, ep.query_y[j]])
        phis.append(_closed_form_phi(theta, x, y, 4, 0.05))
    got = grads_of(loss, m)
    want = theta - torch.stack(phis).mean(0)
    torch.testing.assert_close(torch.cat([got["net.net.0.weight"].reshape(-1), got["net.net.0.bias"]]), want,
                               rtol=1e-12, atol=1e-14)
    # the value is the inner loss at φ_T; the metric the query MSE at φ_T
    inner_x = ep.support_x if inner_set == "support" else torch.cat([ep.support_x, ep.query_x], 1)
    inner_y = ep.support_y if inner_set == "support" else torch.cat([ep.support_y, ep.query_y], 1)
    pred = lambda x: torch.cat([x, torch.ones_like(x[..., :1])], -1) @ torch.stack(phis)[:, :, None]  # noqa: E731
    assert loss.item() == pytest.approx(float(((pred(inner_x) - inner_y) ** 2).mean(dim=(1, 2)).mean()), rel=1e-12)
    torch.testing.assert_close(metric, ((pred(ep.query_x) - ep.query_y) ** 2).mean(dim=(1, 2)), rtol=1e-12, atol=0)


def test_an_sgd_step_of_rate_epsilon_is_the_paper_s_update(gen, f64) -> None:
    """θ ← θ − ε·g with g = θ − mean_j φ_T^j is Algorithm 2: θ ← θ + ε·mean_j(φ_T^j − θ)."""
    ep = _linear_episodes(gen, f64)
    m = _learner(f64, inner_steps=3, inner_lr=0.05)
    theta = _theta(m)
    phi = torch.stack([_closed_form_phi(theta, torch.cat([ep.support_x[j], ep.query_x[j]]),
                                        torch.cat([ep.support_y[j], ep.query_y[j]]), 3, 0.05) for j in range(3)]).mean(0)
    opt = torch.optim.SGD(m.parameters(), lr=0.3)
    m.meta_loss(ep)[0].backward()
    opt.step()
    torch.testing.assert_close(_theta(m), theta + 0.3 * (phi - theta), rtol=1e-12, atol=1e-14)


def test_adam_inner_loop_is_the_paper_s(gen, f64) -> None:
    """inner_optimizer="adam": torch.optim.Adam with β1 = 0 on a copy of the network (independent implementation).
    (Without BatchNorm: the conv biases before it have a zero gradient, whose rounding noise Adam would amplify.)"""
    ep = image_episodes(gen, f64, b=1, ways=2)
    torch.manual_seed(0)
    m = Reptile(example_shape=[1, 16, 16], ways=2, backbone_options={"filters": 4, "bn": "none"}, inner_steps=3,
                inner_lr=1e-3, inner_optimizer="adam").to(f64)
    got = grads_of(m.meta_loss(ep)[0], m)
    copy = {k: v.detach().clone().requires_grad_(True) for k, v in m.net.named_parameters()}
    opt = torch.optim.Adam(copy.values(), lr=1e-3, betas=(0.0, 0.999), eps=1e-8)
    x, y = torch.cat([ep.support_x[0], ep.query_x[0]]), torch.cat([ep.support_y[0], ep.query_y[0]])
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(torch.func.functional_call(m.net, copy, (x,)), y).backward()
        opt.step()
    for k, p in m.net.named_parameters():
        torch.testing.assert_close(got["net." + k], p.detach() - copy[k].detach(), rtol=1e-7, atol=1e-12, msg=k)


def test_test_time_adaptation_is_maml_s(gen, f64) -> None:
    """At test time Reptile adapts on the support set like MAML with the same step size and steps."""
    ep = image_episodes(gen, f64, b=2, ways=3)
    torch.manual_seed(0)
    rep = Reptile(example_shape=[1, 16, 16], ways=3, filters=4, inner_lr=0.1, inner_steps=2, eval_steps=4).to(f64)
    torch.manual_seed(0)
    maml = MAML(example_shape=[1, 16, 16], ways=3, filters=4, inner_lr=0.1, inner_steps=2, eval_steps=4).to(f64)
    with torch.no_grad():
        torch.testing.assert_close(rep(*ep[:3], train=False), maml(*ep[:3], train=False), rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(rep.meta_loss(ep, train=False)[0], maml.meta_loss(ep, train=False)[0])
    assert isinstance(rep.strategy, bl.NoInner) and "hypergrad" not in {f for f in vars(rep.config)}


@pytest.mark.parametrize(("dataset", "extra"), [("glyphs", ["--filters", "8"]), ("sinusoid", ["--inner-lr", "0.01"])])
def test_cli_train_load_predict(tmp_path, dataset, extra) -> None:
    out = tmp_path / "run"
    r = CliRunner().invoke(main, ["reptile", "train", "--dataset", dataset, "--ways", "3", "--shots", "1", "--queries", "2",
                                  "--meta-batch", "2", "--iterations", "3", "--val-every", "3", "--val-episodes", "2",
                                  "--test-episodes", "3", "--inner-steps", "2", *extra, "--no-progress",
                                  "--no-tensorboard", "--out", str(out)])
    assert r.exit_code == 0, r.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test"]["episodes"] == 3 and metrics["learner"] == "reptile"
    model = bl.load(out / "model.pt")
    assert isinstance(model.learner, Reptile) and model.learner.config.inner_steps == 2
    r = CliRunner().invoke(main, ["reptile", "train", "--dataset", dataset, "--hypergrad", "reverse",
                                  "--out", str(tmp_path / "bad")])
    assert r.exit_code == 2 and "No such option '--hypergrad'" in r.output


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # iMAML's true residual warnings on this unconverged sinusoid
@pytest.mark.parametrize("method", ["reptile", "imaml", "anil"])
def test_a_resumed_run_ends_with_the_parameters_of_an_uninterrupted_one(tmp_path, method) -> None:
    """The three new learners through the shared loop's checkpoints: 2 + 2 iterations == 4 (bitwise)."""
    args = [method, "train", "--dataset", "sinusoid", "--shots", "5", "--queries", "5", "--meta-batch", "2",
            "--val-every", "2", "--val-episodes", "2", "--test-episodes", "2", "--checkpoint-every", "2",
            "--inner-lr", "0.01", "--inner-steps", "3", "--no-progress", "--no-tensorboard"]
    runner = CliRunner()
    assert runner.invoke(main, [*args, "--iterations", "2", "--out", str(tmp_path / "a")]).exit_code == 0
    halfway = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)["learner"]
    r = runner.invoke(main, [*args, "--iterations", "4", "--out", str(tmp_path / "a"), "--resume"])
    assert r.exit_code == 0, r.output
    assert runner.invoke(main, [*args, "--iterations", "4", "--out", str(tmp_path / "b")]).exit_code == 0
    a, b = (torch.load(tmp_path / x / "checkpoint.pt", weights_only=True) for x in ("a", "b"))
    assert a["iteration"] == b["iteration"] == 4
    assert all(torch.equal(a["learner"][k], b["learner"][k]) for k in b["learner"])
    assert not all(torch.equal(a["learner"][k], v) for k, v in halfway.items())  # iterations 3-4 did train

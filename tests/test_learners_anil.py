"""ANIL: the head's adaptation against its closed form, the body's meta-gradient through it, the strategies."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from learners_tasks import directional_fd, dot, grads_of, image_episodes, random_direction, regression_episodes

import bilevel as bl
from bilevel.cli import main
from bilevel.hypergrad import from_string
from bilevel.options import OptionError
from learners.anil import ANIL

REG = {"example_shape": [1], "ways": None, "backbone_options": {"hidden": [5], "out_features": 4}}  # body 1→5→4, ReLU
IMG = {"example_shape": [1, 16, 16], "ways": 3, "filters": 4}


def _learner(f64: torch.dtype, spec: dict, **kw) -> ANIL:
    torch.manual_seed(0)
    return ANIL(**spec, **kw).to(f64)


def _closed_form_meta_loss(m: ANIL, ep, steps: int, lr: float) -> torch.Tensor:
    """Squared loss on body features: GD on the head [w; b] is linear,
    φ_T = (I − αH)^T φ_0 + Σ_{s<T} (I − αH)^s αc with H = 2/n Z̃ᵀZ̃, c = 2/n Z̃ᵀy (Z̃ = [Z, 1]);
    written with matrix powers (no loop over steps), differentiable in θ and φ_0 by autograd."""
    phi0 = torch.cat([m.head.weight.reshape(-1), m.head.bias])
    losses = []
    for j in range(ep.support_x.shape[0]):
        zs = torch.relu(m.body[0](ep.support_x[j]))  # the body, by hand: MLP then the final ReLU
        zq = torch.relu(m.body[0](ep.query_x[j]))
        zs, zq = (torch.cat([z, torch.ones_like(z[:, :1])], 1) for z in (zs, zq))
        n = zs.shape[0]
        h = 2 / n * zs.T @ zs
        c = 2 / n * zs.T @ ep.support_y[j][:, 0]
        step = torch.eye(h.shape[0], dtype=h.dtype) - lr * h
        phi = torch.linalg.matrix_power(step, steps) @ phi0
        phi = phi + sum(torch.linalg.matrix_power(step, s) for s in range(steps)) @ (lr * c)
        losses.append(((zq @ phi - ep.query_y[j][:, 0]) ** 2).mean())
    return torch.stack(losses).mean()


@pytest.mark.parametrize("batch_tasks", ["auto", "never"])
def test_head_adaptation_and_meta_gradient_are_the_closed_form(gen, f64, batch_tasks) -> None:
    ep = regression_episodes(gen, f64, b=3)
    m = _learner(f64, REG, inner_steps=4, inner_lr=0.05, batch_tasks=batch_tasks)
    loss = m.meta_loss(ep)[0]
    ref = _closed_form_meta_loss(m, ep, 4, 0.05)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-12)
    got, want = grads_of(loss, m), grads_of(ref, m)
    assert set(got) == {k for k, _ in m.named_parameters()}  # body and head initialisation both meta-learned
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, rtol=1e-10, atol=1e-13, msg=k)
    assert all(float(v.abs().max()) > 0 for v in got.values())


def test_the_body_is_not_adapted(gen, f64) -> None:
    """Only the head changes in the inner loop: predictions equal the body's features times the adapted head."""
    ep = image_episodes(gen, f64, b=2, ways=3)
    m = _learner(f64, IMG, inner_steps=3)
    with torch.no_grad():
        pred = m(ep.support_x, ep.support_y, ep.query_x, train=False)
        zs, zq = (torch.stack([m.body(x[j]) for j in range(2)]) for x in (ep.support_x, ep.query_x))
        w, b = m.head.weight.expand(2, -1, -1).clone(), m.head.bias.expand(2, -1).clone()
        for _ in range(3):  # cross-entropy gradient of a linear head, in closed form
            r = (torch.softmax(zs @ w.mT + b[:, None], -1) - F.one_hot(ep.support_y, 3).to(f64)) / zs.shape[1]
            w, b = w - 0.4 * r.mT @ zs, b - 0.4 * r.sum(1)
    torch.testing.assert_close(pred, zq @ w.mT + b[:, None], rtol=1e-12, atol=1e-13)


def test_meta_gradient_matches_finite_differences(gen, f64) -> None:
    ep = image_episodes(gen, f64, b=2, ways=3)
    m = _learner(f64, IMG, inner_steps=2, inner_lr=0.3)
    direction = random_direction(m, gen)
    analytic = dot(grads_of(m.meta_loss(ep)[0], m), direction)
    assert analytic == pytest.approx(directional_fd(lambda: m.meta_loss(ep)[0], m, direction), rel=1e-6)


@pytest.mark.parametrize("spec", [REG, IMG], ids=["regression", "images"])
def test_reverse_checkpointed_forward_agree_and_batching_is_exact(gen, f64, spec) -> None:
    ep = regression_episodes(gen, f64, b=3) if spec is REG else image_episodes(gen, f64, b=3, ways=3)
    grads = {}
    for hypergrad in ("reverse", "checkpointed:2", "forward"):
        for batch_tasks in ("auto", "never"):
            m = _learner(f64, spec, inner_steps=3, inner_lr=0.05, hypergrad=from_string(hypergrad), batch_tasks=batch_tasks)
            grads[hypergrad, batch_tasks] = grads_of(m.meta_loss(ep)[0], m)
    ref = grads["reverse", "auto"]
    for key, g in grads.items():
        for k, v in ref.items():  # (conv biases before BatchNorm have a zero gradient: atol)
            torch.testing.assert_close(g[k], v, rtol=1e-9, atol=1e-14, msg=f"{key} {k}")


def test_first_order_keeps_the_inner_gradients_constant(gen, f64) -> None:
    """T = 1, first order: the head initialisation gets ∇_w E(w_1) and the body only the query-feature path."""
    ep = regression_episodes(gen, f64, b=1)
    m = _learner(f64, REG, inner_steps=1, inner_lr=0.05, hypergrad=bl.FirstOrder())
    got = grads_of(m.meta_loss(ep)[0], m)
    zs = m.features(ep.support_x)[0].detach()
    w0 = {"weight": m.head.weight.detach().requires_grad_(True), "bias": m.head.bias.detach().requires_grad_(True)}
    inner = (((zs @ w0["weight"].T + w0["bias"]) - ep.support_y[0]) ** 2).mean()
    g = torch.autograd.grad(inner, list(w0.values()))
    w1 = {k: v.detach() - 0.05 * gk for (k, v), gk in zip(w0.items(), g)}
    zq = m.features(ep.query_x)[0]
    outer = (((zq @ w1["weight"].T + w1["bias"]) - ep.query_y[0]) ** 2).mean()
    want = grads_of(outer, m.body)
    for k, v in want.items():
        torch.testing.assert_close(got["body." + k], v, rtol=1e-12, atol=1e-14, msg=k)
    w1 = {k: v.requires_grad_(True) for k, v in w1.items()}
    e_grad = torch.autograd.grad((((zq.detach() @ w1["weight"].T + w1["bias"]) - ep.query_y[0]) ** 2).mean(), list(w1.values()))
    torch.testing.assert_close(got["head.weight"], e_grad[0], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(got["head.bias"], e_grad[1], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("hypergrad", ["implicit-cg:5", "no-inner"])
def test_strategies_that_give_the_head_no_meta_gradient_are_refused(hypergrad) -> None:
    with pytest.raises(OptionError, match="gives the initialisation θ no meta-gradient"):
        ANIL(**IMG, hypergrad=from_string(hypergrad))


def test_network_is_maml_s(f64) -> None:
    """Sinusoid: 1 → 40 → ReLU → 40 → ReLU body and a 40 → 1 head; images: Conv-4 body and an N-way head."""
    m = ANIL(example_shape=[1], ways=None)
    assert [tuple(p.shape) for p in m.parameters()] == [(40, 1), (40,), (40, 40), (40,), (1, 40), (1,)]
    x = torch.randn(7, 1)
    assert bool((m.body(x) >= 0).all())
    m = ANIL(example_shape=[1, 28, 28], ways=5, filters=32)
    assert m.head.weight.shape == (5, 32)
    with pytest.raises(OptionError, match="5-way head; it cannot classify 6"):
        m.check_ways(6)


@pytest.mark.parametrize(("dataset", "extra"), [("glyphs", ["--filters", "8"]), ("sinusoid", ["--inner-lr", "0.01"])])
def test_cli_train_load_predict(tmp_path, dataset, extra) -> None:
    out = tmp_path / "run"
    r = CliRunner().invoke(main, ["anil", "train", "--dataset", dataset, "--ways", "3", "--shots", "1", "--queries", "2",
                                  "--meta-batch", "2", "--iterations", "3", "--val-every", "3", "--val-episodes", "2",
                                  "--test-episodes", "3", *extra, "--no-progress", "--no-tensorboard", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert json.loads((out / "metrics.json").read_text())["test"]["episodes"] == 3
    model = bl.load(out / "model.pt")
    assert isinstance(model.learner, ANIL)
    if dataset == "glyphs":
        x = torch.rand(5, 1, 28, 28)
        assert model.predict(x[:3], torch.tensor([0, 1, 2]), x[3:]).shape == (2, 3)

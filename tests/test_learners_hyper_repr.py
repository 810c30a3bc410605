"""Hyper-Representation: batched ground models, hypergradient strategies, Appendix-A variants."""
from __future__ import annotations

import warnings

import pytest
import torch

import bilevel as bl
import torch.nn.functional as F
from learners_tasks import grads_of, image_episodes, regression_episodes

from bilevel.data.sampler import Episodes
from learners.hyper_repr import HyperRepr

IMG = {"example_shape": [1, 16, 16], "ways": 3, "backbone_options": {"filters": 4}}  # conv4-32 with 4 filters: d = 4


def _learner(f64: torch.dtype, **kw) -> HyperRepr:
    torch.manual_seed(0)
    return HyperRepr(**{**IMG, **kw}).to(f64)


def _episodes(gen: torch.Generator, f64: torch.dtype, b: int = 3) -> Episodes:
    return image_episodes(gen, f64, b=b, ways=3, shots=2, queries=2)


def _manual_meta_loss(m: HyperRepr, ep: Episodes, steps: int, l2: float = 0.0) -> torch.Tensor:
    """Per-episode loop with the logistic-regression gradient written in closed form."""
    eta = m.log_eta.exp()
    losses = []
    for j in range(ep.support_x.shape[0]):
        zs, zq = m.h(ep.support_x[j]), m.h(ep.query_x[j])
        n, n_way = zs.shape[0], int(ep.support_y[j].max()) + 1
        y = F.one_hot(ep.support_y[j], n_way).to(zs.dtype)
        w = zs.new_zeros(zs.shape[1], n_way)
        b = zs.new_zeros(n_way)
        for _ in range(steps):
            r = (torch.softmax(zs @ w + b, dim=1) - y) / n  # d mean-CE / d logits
            w, b = w - eta * (zs.T @ r + l2 * w), b - eta * r.sum(0)
        losses.append(F.cross_entropy(zq @ w + b, ep.query_y[j]))
    return torch.stack(losses).mean()


def test_reverse_matches_manual_per_episode_unroll(gen: torch.Generator, f64: torch.dtype) -> None:
    ep = _episodes(gen, f64)
    m = _learner(f64, inner_steps=4, inner_lr=0.5, l2=0.1)
    assert m.h.out_features == 4 and m.config.backbone is None and m.strategy.__class__.__name__ == "Reverse"
    loss = m.meta_loss(ep)[0]
    ref = _manual_meta_loss(m, ep, 4, l2=0.1)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-12)
    got, want = grads_of(loss, m), grads_of(ref, m)
    assert abs(got["log_eta"].item()) > 1e-6
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, rtol=1e-9, atol=1e-13, msg=k)


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_batched_equals_per_episode(gen: torch.Generator, f64: torch.dtype, task: str) -> None:
    if task == "regression":
        ep = regression_episodes(gen, f64, b=3)
        m = _learner(f64, example_shape=[1], ways=None, backbone_options={"hidden": [5], "out_features": 6})
    else:
        ep, m = _episodes(gen, f64), _learner(f64)
    pred = m(ep.support_x, ep.support_y, ep.query_x)
    singles = [m(*(t[j : j + 1] for t in (ep.support_x, ep.support_y, ep.query_x)))[0] for j in range(3)]
    torch.testing.assert_close(pred, torch.stack(singles), rtol=1e-12, atol=1e-14)
    got = grads_of(m.meta_loss(ep)[0], m)
    per = [grads_of(m.meta_loss(Episodes(*(t[j : j + 1] for t in ep)))[0], m) for j in range(3)]
    for k, v in got.items():
        torch.testing.assert_close(v, sum(p[k] for p in per) / 3, rtol=1e-10, atol=1e-13, msg=k)


def test_implicit_matches_reverse_when_converged(gen: torch.Generator, f64: torch.dtype) -> None:
    """l2 > 0 makes each ground problem strongly convex; 800 steps reach its minimiser."""
    ep = _episodes(gen, f64, b=2)
    rev = _learner(f64, inner_steps=800, inner_lr=0.5, l2=0.5)
    imp = _learner(f64, inner_steps=800, inner_lr=0.5, l2=0.5, hypergrad=bl.Implicit(bl.CG(50)))
    w = rev.fit_ground_models(rev.features(ep.support_x), ep.support_y, 800)
    stationarity = torch.autograd.grad(rev.inner_loss(w, {"features": rev.features(ep.support_x).detach()}, ep.support_y), w["W"])[0]
    assert stationarity.abs().max().item() < 1e-10
    g_rev, g_imp = grads_of(rev.meta_loss(ep)[0], rev), grads_of(imp.meta_loss(ep)[0], imp)
    for k in g_rev:
        if k != "log_eta":
            torch.testing.assert_close(g_imp[k], g_rev[k], rtol=1e-6, atol=1e-10, msg=k)
    assert g_imp["log_eta"].item() == 0.0 and abs(g_rev["log_eta"].item()) < 1e-8


def test_forward_gives_exact_eta_and_approx_representation_gradient(gen: torch.Generator, f64: torch.dtype) -> None:
    ep = _episodes(gen, f64)
    rev, fwd = _learner(f64, inner_steps=4, inner_lr=0.5), _learner(f64, inner_steps=4, inner_lr=0.5, hypergrad=bl.Forward())
    approx = _learner(f64, inner_steps=4, inner_lr=0.5, variant="approx")
    g_rev, g_fwd = grads_of(rev.meta_loss(ep)[0], rev), grads_of(fwd.meta_loss(ep)[0], fwd)
    assert g_fwd["log_eta"].item() == pytest.approx(g_rev["log_eta"].item(), rel=1e-10)
    g_approx = grads_of(approx.meta_loss(ep)[0], approx)
    for k in g_approx:
        if k != "log_eta":
            torch.testing.assert_close(g_fwd[k], g_approx[k], rtol=1e-10, atol=1e-14, msg=k)
    assert not torch.allclose(g_fwd["h.convs.0.weight"], g_rev["h.convs.0.weight"], rtol=1e-3)


def test_approx_holds_the_ground_models_constant(gen: torch.Generator, f64: torch.dtype) -> None:
    ep = _episodes(gen, f64)
    m = _learner(f64, inner_steps=3, variant="approx")
    assert not m.log_eta.requires_grad and m.strategy.__class__.__name__ == "NoInner"
    got = grads_of(m.meta_loss(ep)[0], m)
    with torch.no_grad():
        w = m.fit_ground_models(m.features(ep.support_x), ep.support_y, 3)
    want = grads_of(m.query_loss(m.ground_predict(w, m.features(ep.query_x)), ep.query_y).mean(), m)
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, rtol=1e-12, atol=1e-14, msg=k)


def test_classic_is_joint_training_error_without_split(gen: torch.Generator, f64: torch.dtype) -> None:
    ep = _episodes(gen, f64)
    m = _learner(f64, inner_steps=3, variant="classic")
    loss, metric = m.meta_loss(ep, train=True)
    x, y = torch.cat([ep.support_x, ep.query_x], 1), torch.cat([ep.support_y, ep.query_y], 1)
    # independent: per episode, ground model fitted (constant) on all 12 examples, loss on the same examples
    want = []
    for j in range(3):
        z = m.h(x[j])
        with torch.no_grad():
            w = m.fit_ground_models(z.detach()[None], y[j : j + 1], 3)
        want.append(F.cross_entropy(z @ w["W"][0] + w["b"][0], y[j]))
    want_loss = torch.stack(want).mean()
    assert loss.item() == pytest.approx(want_loss.item(), rel=1e-12) and metric.shape == (3,)
    got, ref = grads_of(loss, m), grads_of(want_loss, m)
    for k, v in ref.items():
        torch.testing.assert_close(got[k], v, rtol=1e-10, atol=1e-14, msg=k)
    # evaluation is the ordinary few-shot protocol: fit on the support, score the queries
    bilevel = _learner(f64, inner_steps=3)
    with torch.no_grad():
        torch.testing.assert_close(m.meta_loss(ep, train=False)[0], bilevel.meta_loss(ep, train=False)[0], rtol=1e-12, atol=0)


@pytest.mark.parametrize(("kw", "match"), [({"variant": "joint"}, "variant must be one of"),
                                            ({"variant": "approx", "hypergrad": bl.Reverse()}, "fixes the hypergradient"),
                                            ({"l2": -1.0}, "l2 must be"),
                                            ({"backbone_options": {"filters": 4, "bn": "running"}}, "must be pure")])
def test_bad_options(kw: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        HyperRepr(**{**IMG, **kw})


def test_cli_implicit_hypergradient_needs_l2_and_then_matches_the_unrolled_one(tmp_path) -> None:
    """`bilevel hyper-repr --hypergrad implicit-cg:K` at the CLI: refused with l2 = 0 (no unique inner
    minimiser); with --l2 0.5 --inner-steps 300 --inner-lr 0.5 (heads converged: with the default η = 0.1
    200 steps leave the cosine at 0.995, and the implicit certificate warns) its representation meta-gradient has cosine >= 0.999 with
    the exact unrolled one on glyph episodes (float32, as trained), and η gets zero (the minimiser does
    not depend on the step size; the unrolled η-gradient is negligible against the representation's)."""
    from click.testing import CliRunner

    from bilevel import options as opts
    from bilevel.cli import main
    from bilevel.run_config import DataConfig, build_samplers

    r = CliRunner().invoke(main, ["hyper-repr", "train", "--hypergrad", "implicit-cg:50", "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "Invalid value for '--l2'" in r.output and "have none" in r.output, r.output
    assert not (tmp_path / "o").exists()
    samplers = build_samplers(DataConfig(dataset="glyphs", ways=5, shots=1, queries=3, meta_batch=4), seed=0, splits=("train",))
    ep = samplers.train.sample(0)
    grads = {}
    for text in ("implicit-cg:50", "reverse"):
        config = opts.from_text(HyperRepr.Config, {"hypergrad": text, "l2": "0.5", "inner_steps": "300", "inner_lr": "0.5",
                                                   "filters": "8"})
        torch.manual_seed(0)
        m = HyperRepr(example_shape=samplers.example_shape, ways=5, config=config)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # converged heads: the certificate stays silent
            grads[text] = grads_of(m.meta_loss(ep)[0], m)
    rep = [k for k in grads["reverse"] if k != "log_eta"]
    g_imp = torch.cat([grads["implicit-cg:50"][k].reshape(-1) for k in rep])
    g_rev = torch.cat([grads["reverse"][k].reshape(-1) for k in rep])
    cosine = float(g_imp @ g_rev / (g_imp.norm() * g_rev.norm()))
    assert cosine >= 0.999, cosine
    assert 0.9 < float(g_imp.norm() / g_rev.norm()) < 1.1
    assert grads["implicit-cg:50"]["log_eta"].item() == 0.0
    assert abs(grads["reverse"]["log_eta"].item()) < 1e-3 * float(g_rev.norm())

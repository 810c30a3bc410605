"""The MetaOptNet learner: scale, label smoothing, meta-gradients, CLI, save/load."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from learners_tasks import directional_fd, grads_of, image_episodes

import bilevel
from bilevel.cli import main
from learners.heads import proto_head, smooth_labels
from learners.metaoptnet import MetaOptNet


def _learner(f64, **kw):
    torch.manual_seed(0)
    return MetaOptNet(example_shape=[1, 16, 16], ways=3, backbone_options={"filters": 4}, **kw).to(f64)


def test_proto_meta_gradient_equals_a_manual_computation(gen, f64):
    ep = image_episodes(gen, f64, b=2, ways=3, shots=2, queries=2)
    m = _learner(f64, head="proto", scale=2.0)
    loss, _ = m.meta_loss(ep)
    got = grads_of(loss, m)
    # independent: per-episode embeddings, class means, -|q - c|^2 / d, γ-scaled cross-entropy
    params = dict(m.named_parameters())
    total = 0.0
    for j in range(2):
        s, q = m.embed(ep.support_x[j]), m.embed(ep.query_x[j])
        c = torch.stack([s[ep.support_y[j] == k].mean(0) for k in range(3)])
        logits = -((q[:, None, :] - c[None]) ** 2).sum(-1) / s.shape[1]
        total = total + F.cross_entropy(params["scale"] * logits, ep.query_y[j])
    ref = torch.autograd.grad(total / 2, list(params.values()))
    for (k, _), r in zip(params.items(), ref):
        torch.testing.assert_close(got[k], r, rtol=1e-10, atol=1e-12, msg=k)


@pytest.mark.parametrize("head", ["svm", "ridge", "r2d2"])
def test_convex_heads_meta_gradient_matches_finite_differences(gen, f64, head):
    ep = image_episodes(gen, f64, b=2, ways=3, shots=2, queries=2)
    m = _learner(f64, head=head, label_smoothing=0.1)
    loss, _ = m.meta_loss(ep)
    g = grads_of(loss, m)
    direction = {k: torch.randn(p.shape, generator=gen, dtype=f64) for k, p in m.named_parameters()}
    analytic = sum(float((g[k] * d).sum()) for k, d in direction.items())
    numeric = directional_fd(lambda: m.meta_loss(ep)[0], m, direction)
    assert analytic == pytest.approx(numeric, rel=1e-5, abs=1e-8)


def test_label_smoothing_and_scale(gen, f64):
    ep = image_episodes(gen, f64, b=2, ways=3, shots=2, queries=2)
    m = _learner(f64, head="proto", label_smoothing=0.2, scale=3.0)
    pred = m(ep.support_x, ep.support_y, ep.query_x)
    unscaled = proto_head(torch.stack([m.embed(x) for x in ep.query_x]), torch.stack([m.embed(x) for x in ep.support_x]),
                          ep.support_y, 3)
    torch.testing.assert_close(pred, 3.0 * unscaled)
    target = smooth_labels(ep.query_y, 3, 0.2)
    ref = -(target * F.log_softmax(pred, -1)).sum(-1).mean(1)
    torch.testing.assert_close(m.query_loss(pred, ep.query_y), ref)


def test_bad_options():
    with pytest.raises(ValueError, match="head must be one of"):
        MetaOptNet(example_shape=[1, 16, 16], ways=3, head="knn")
    with pytest.raises(ValueError, match="C"):
        MetaOptNet(example_shape=[1, 16, 16], ways=3, C=0.0)
    with pytest.raises(ValueError, match="classification learner"):
        MetaOptNet(example_shape=[1], ways=None)


@pytest.mark.parametrize("head", ["svm", "proto"])
def test_cli_train_higher_train_shot_then_load_and_predict(tmp_path, head):
    out = tmp_path / head
    r = CliRunner().invoke(main, ["metaoptnet", "train", "--head", head, "--dataset", "glyphs", "--ways", "3", "--shots", "1",
                                  "--train-shots", "3", "--queries", "2", "--meta-batch", "2", "--filters", "8",
                                  "--iterations", "3", "--val-every", "3", "--val-episodes", "2", "--test-episodes", "4",
                                  "--eval-max-iter", "3", "--no-progress", "--no-tensorboard", "--out", str(out)])
    assert r.exit_code == 0, r.output
    model = bilevel.load(out / "model.pt")
    x = torch.rand(6, 1, 28, 28)
    logits = model.predict(x[:3], torch.tensor([0, 1, 2]), x[3:])
    assert logits.shape == (3, 3) and torch.isfinite(logits).all()
    r = CliRunner().invoke(main, ["metaoptnet", "eval", "--checkpoint", str(out), "--dataset", "glyphs", "--ways", "4",
                                  "--shots", "2", "--queries", "2", "--episodes", "4", "--no-progress"])
    assert r.exit_code == 0 and "accuracy:" in r.output, r.output

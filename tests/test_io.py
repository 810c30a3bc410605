"""Atomic checkpoints, the model file format, and bilevel.load(...).predict / .transform,
round-tripped with tiny learners defined here (the learners package is not needed)."""
from __future__ import annotations

import os

import pytest
import torch
from PIL import Image
from torch import nn

import bilevel
from bilevel.data import EpisodeSampler, SinusoidSampler, load_dataset, load_splits
from bilevel.evaluation import evaluate
from bilevel.io import FewShotLearner, atomic_save, load, save_model
from bilevel.models import build_backbone
from bilevel.registry import unregister_learner


class TinyProtoNet(nn.Module):
    """Nearest-centroid learner (Snell et al. 2017) on a small Conv-4: the test learner."""

    def __init__(self, backbone: dict, scale: float = 1.0) -> None:
        super().__init__()
        self.backbone = build_backbone(**backbone)
        self.scale = scale

    def logits(self, sx, sy, qx, n_way):
        z = self.backbone(torch.cat([sx, qx]))
        zs, zq = z[: len(sx)], z[len(sx):]
        protos = torch.zeros(n_way, z.shape[1]).index_add_(0, sy, zs)
        protos = protos / torch.bincount(sy, minlength=n_way).unsqueeze(1)
        return -self.scale * torch.cdist(zq, protos).pow(2) / z.shape[1]

    def predict_episode(self, support_x, support_y, query_x, n_way):
        with torch.no_grad():
            return self.logits(support_x, support_y, query_x, n_way)


class MeanRegressor:
    """Regression learner: predicts w * mean(support_y) (protocol without nn.Module)."""

    def __init__(self) -> None:
        self.w = torch.ones(1)

    def load_state_dict(self, state):
        self.w = state["w"].clone()

    def predict_episode(self, support_x, support_y, query_x, n_way):
        assert n_way is None
        return self.w * support_y.mean(0, keepdim=True).expand(len(query_x), -1)


class NoPredict:
    def load_state_dict(self, state):
        pass


class WrongShape(TinyProtoNet):
    def predict_episode(self, support_x, support_y, query_x, n_way):
        return torch.zeros(len(query_x), n_way + 1)


BACKBONE = {"name": "conv4", "in_channels": 1, "filters": 16, "image_size": 28}


@pytest.fixture(scope="module", autouse=True)
def registered():
    """The test learners, registered under their names for this module (bilevel.load finds them only so)."""
    names = {"tiny-proto": TinyProtoNet, "mean-regressor": MeanRegressor, "no-predict": NoPredict, "wrong-shape": WrongShape}
    for name, cls in names.items():
        bilevel.register_learner(name, cls)
    yield
    for name in names:
        unregister_learner(name)


@pytest.fixture(scope="module")
def glyphs():
    return load_splits("glyphs", classes={"train": 40, "val": 5, "test": 20}, examples_per_class=10)


@pytest.fixture(scope="module")
def trained(glyphs):
    """TinyProtoNet meta-trained for 25 steps (~0.5 s on one thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convs: threads only contend with the other test workers
    try:
        with torch.random.fork_rng(devices=[]):  # seeded init without touching the global RNG
            torch.manual_seed(0)
            net = TinyProtoNet(BACKBONE, scale=1.0)
        opt = torch.optim.Adam(net.parameters(), lr=3e-3)
        sampler = EpisodeSampler(glyphs["train"], ways=5, shots=2, queries=3, meta_batch=4, seed=0)
        for _ in range(25):
            ep = sampler.next()
            loss = sum(
                nn.functional.cross_entropy(net.logits(*ep.episode(j)[:3], 5), ep.query_y[j])
                for j in range(ep.batch_size)
            )
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    net.eval()
    return net


def test_atomic_save_replaces_whole_file_or_nothing(tmp_path, monkeypatch):
    path = tmp_path / "sub" / "ckpt.pt"
    atomic_save({"step": 1, "w": torch.arange(3)}, path)
    assert torch.load(path, weights_only=True)["step"] == 1
    real_save = torch.save

    def crash(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        f.write(b"partial")
        raise RuntimeError("killed mid-write")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(RuntimeError, match="killed mid-write"):
        atomic_save({"step": 2}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.load(path, weights_only=True)["step"] == 1  # old content intact
    assert os.listdir(path.parent) == ["ckpt.pt"]  # no temporary file left behind
    atomic_save({"step": 3}, path)
    assert torch.load(path, weights_only=True)["step"] == 3


def test_round_trip_predict_and_transform(glyphs, trained, tmp_path):
    path = tmp_path / "proto.pt"
    test = glyphs["test"]
    save_model(path, learner="tiny-proto", config={"backbone": BACKBONE, "scale": 1.0},
               state=trained.state_dict(), transform=test.transform,
               metadata={"dataset": "glyphs", "ways": 5, "shots": 2})
    raw = torch.load(path, weights_only=True)  # plain content only
    assert raw["format"] == "bilevel.model" and raw["learner"] == "tiny-proto"
    assert raw["transform"]["name"] == "glyphs" and raw["transform"]["size"] == [28, 28]

    model = bilevel.load(path)
    assert isinstance(model.learner, TinyProtoNet) and not model.learner.training
    assert isinstance(model.learner, FewShotLearner)
    assert model.metadata == {"dataset": "glyphs", "ways": 5, "shots": 2}
    assert model.example_shape == (1, 28, 28) and model.task == "classification"

    ep = EpisodeSampler(test, ways=5, shots=2, queries=3, seed=1).sample(0).episode(0)
    logits = model.predict(ep.support_x, ep.support_y, ep.query_x)
    assert logits.shape == (15, 5) and not logits.requires_grad
    assert torch.equal(logits, trained.predict_episode(ep.support_x, ep.support_y, ep.query_x, 5))

    # the same episode given as PIL images (dark strokes on white, like a scan) through .transform
    plan = EpisodeSampler(test, ways=5, shots=2, queries=3, seed=1).plan(0)
    to_pil = lambda i: Image.fromarray(255 - test.images[i, 0].numpy())  # noqa: E731
    sx = torch.stack([model.transform(to_pil(i)) for i in plan.support[0].tolist()])
    assert torch.equal(sx, ep.support_x)
    qpil = [to_pil(i) for i in plan.query[0].tolist()]
    assert torch.equal(model.predict(sx, ep.support_y, qpil), logits)
    # larger scans are resized by the transform like the training data was
    big = [im.resize((105, 105), Image.BILINEAR) for im in qpil]
    agree = (model.predict(sx, ep.support_y, big).argmax(1) == logits.argmax(1)).float().mean()
    assert float(agree) >= 0.8


def test_loaded_model_beats_chance_on_unseen_classes(glyphs, trained, tmp_path):
    path = tmp_path / "proto.pt"
    save_model(path, learner="tiny-proto", config={"backbone": BACKBONE}, state=trained.state_dict(),
               transform={"name": "glyphs"})
    model = load(path)
    res = evaluate(model.predict, EpisodeSampler(glyphs["test"], 5, 2, 3, meta_batch=10, seed=3), 60)
    assert res["metric"] == "accuracy" and res["episodes"] == 60
    assert res["mean"] > 0.85, res  # chance is 0.2; the untrained network gets ~0.75
    assert 0 < res["ci95"] < 0.1


def test_predict_validates_inputs(glyphs, trained, tmp_path):
    path = tmp_path / "m.pt"
    save_model(path, learner="tiny-proto", config={"backbone": BACKBONE}, state=trained.state_dict(),
               transform="glyphs")
    model = load(path)
    ep = EpisodeSampler(glyphs["test"], 3, 2, 2).sample(0).episode(0)
    sx, sy, qx = ep.support_x, ep.support_y, ep.query_x
    with pytest.raises(ValueError, match=r"support_x has shape \(6, 3, 28, 28\), expected \[n, 1, 28, 28\]"):
        model.predict(sx.expand(-1, 3, -1, -1), sy, qx)
    with pytest.raises(ValueError, match=r"query_x has shape \(6, 28, 28\)"):
        model.predict(sx, sy, qx[:, 0])
    with pytest.raises(ValueError, match=r"missing labels \[1\]"):
        model.predict(sx, torch.tensor([0, 0, 2, 2, 0, 2]), qx)
    with pytest.raises(ValueError, match=r"labels must be in 0..N-1, found -1"):
        model.predict(sx, sy - 1, qx)
    with pytest.raises(ValueError, match=r"support_y must have shape \[6\]"):
        model.predict(sx, sy[:5], qx)
    with pytest.raises(TypeError, match="integer tensor of labels"):
        model.predict(sx, sy.float(), qx)
    with pytest.raises(TypeError, match="float tensor"):
        model.predict((sx * 255).to(torch.uint8), sy, qx)
    with pytest.raises(TypeError, match="non-empty sequence of PIL images"):
        model.predict(sx, sy, [])
    assert model.predict(sx, sy.tolist(), qx).shape == (6, 3)  # plain label lists are fine


def test_save_model_validates(trained, tmp_path):
    kw = dict(config={"backbone": BACKBONE}, state=trained.state_dict(), transform="glyphs")
    with pytest.raises(ValueError, match="no learner is registered as 'tests.test_io.TinyProtoNet'"):
        save_model(tmp_path / "a.pt", learner="tests.test_io.TinyProtoNet", **kw)
    with pytest.raises(TypeError, match="config must be JSON-like"):
        save_model(tmp_path / "a.pt", learner="tiny-proto", config={"f": object()},
                   state=kw["state"], transform="glyphs")
    with pytest.raises(TypeError, match=r"config keys must be str, got \[1\]"):
        save_model(tmp_path / "a.pt", learner="tiny-proto", config={1: 2}, state={}, transform="glyphs")
    with pytest.raises(TypeError, match="key 'w' has int"):
        save_model(tmp_path / "a.pt", learner="tiny-proto", config={}, state={"w": 3}, transform="glyphs")
    with pytest.raises(ValueError, match="unknown transform"):
        save_model(tmp_path / "a.pt", learner="tiny-proto", config={}, state={}, transform={"name": "x"})
    assert not (tmp_path / "a.pt").exists()


def test_load_errors(trained, tmp_path):
    with pytest.raises(FileNotFoundError, match="model file not found"):
        load(tmp_path / "none.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "plain.pt")
    with pytest.raises(ValueError, match="not a bilevel model file"):
        load(tmp_path / "plain.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(ValueError, match="model file .*junk.pt is not a PyTorch file"):
        load(tmp_path / "junk.pt")
    save_model(tmp_path / "np.pt", learner="no-predict", config={}, state={},
               transform="glyphs")
    with pytest.raises(TypeError, match=r"lacks predict_episode\(\)"):
        load(tmp_path / "np.pt")
    payload = torch.load(tmp_path / "np.pt", weights_only=True)
    payload["version"] = 99
    atomic_save(payload, tmp_path / "v99.pt")
    with pytest.raises(ValueError, match="version 99"):
        load(tmp_path / "v99.pt")
    save_model(tmp_path / "ws.pt", learner="wrong-shape", config={"backbone": BACKBONE},
               state=trained.state_dict(), transform="glyphs")
    m = load(tmp_path / "ws.pt")
    x = torch.zeros(2, 1, 28, 28)
    with pytest.raises(ValueError, match=r"returned shape \(2, 3\), expected \[n_query, N\] = \[2, 2\]"):
        m.predict(x, torch.tensor([0, 1]), x)


def test_regression_model_round_trip(tmp_path):
    path = tmp_path / "reg.pt"
    save_model(path, learner="mean-regressor", config={}, state={"w": torch.tensor([2.0])},
               transform={"name": "sinusoid"})
    model = load(path)
    assert model.task == "regression" and model.example_shape == (1,)
    ep = SinusoidSampler(load_dataset("sinusoid", split="test"), 5, 4, meta_batch=3).sample(0)
    sx, sy, qx, qy = ep.episode(0)
    out = model.predict(sx, sy, qx)
    torch.testing.assert_close(out, 2.0 * sy.mean(0, keepdim=True).expand(4, 1))
    assert torch.equal(model.predict(sx, sy[:, 0], qx), out)  # [K] targets are accepted
    assert torch.equal(model.transform(0.5), torch.tensor([0.5]))
    res = evaluate(model.predict, SinusoidSampler(load_dataset("sinusoid", split="test"), 5, 4, 3), 7)
    assert res["metric"] == "mse" and res["episodes"] == 7 and res["mean"] > 0

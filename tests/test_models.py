"""Backbones: shapes / feature dims, purity of functional calls, vmap over tasks, BN policies,
DropBlock, factory errors."""
from __future__ import annotations

import copy

import pytest
import torch
from torch.func import functional_call, vmap

from bilevel.models import (
    BN_POLICIES,
    DropBlock,
    available_backbones,
    build_backbone,
    conv4,
    mlp,
    resnet12,
)


def _snapshot(m: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


@pytest.mark.parametrize(
    "factory,kw,x_shape,feat",
    [
        (conv4, dict(in_channels=1, image_size=28), (5, 1, 28, 28), 64),
        (conv4, dict(in_channels=3, image_size=84), (2, 3, 84, 84), 1600),
        (conv4, dict(in_channels=3, filters=32, image_size=84), (2, 3, 84, 84), 800),
        (conv4, dict(in_channels=1, image_size=28, pool="stride", n_classes=5), (3, 1, 28, 28), 5),
        (resnet12, dict(), (2, 3, 84, 84), 16000),
        (resnet12, dict(variant="cifar"), (3, 3, 32, 32), 2560),
        (mlp, dict(), (7, 1), 1),
    ],
)
def test_output_shapes_match_out_features(factory, kw, x_shape, feat, gen):
    m = factory(**kw)
    assert m.out_features == feat
    y = m(torch.randn(*x_shape, generator=gen))
    assert y.shape == (x_shape[0], feat)


def test_resnet12_matches_metaoptnet_size():
    m = resnet12()
    # MetaOptNet's ResNet-12 (64-160-320-640, 1x1 shortcuts): 12.4M parameters
    assert sum(p.numel() for p in m.parameters()) == 12_424_320
    assert [b.drop.block_size for b in m.blocks] == [1, 1, 5, 5]
    assert [b.drop.block_size for b in resnet12(variant="cifar").blocks] == [1, 1, 2, 2]
    assert len(list(m.buffers())) == 0  # bn="task": nothing to mutate


@pytest.mark.parametrize("name", ["conv4", "resnet12-cifar", "mlp"])
def test_functional_call_is_pure_and_equals_module(name, gen):
    kw = {"conv4": dict(in_channels=1, image_size=28, filters=8),
          "resnet12-cifar": dict(channels=(4, 6, 8, 10), drop_rate=0.0),
          "mlp": {}}[name]
    m = build_backbone(name, **kw)
    shape = {"conv4": (4, 1, 28, 28), "resnet12-cifar": (3, 3, 32, 32), "mlp": (6, 1)}[name]
    x = torch.randn(*shape, generator=gen)
    before = _snapshot(m)
    params = dict(m.named_parameters())
    torch.testing.assert_close(functional_call(m, params, (x,)), m(x), rtol=0, atol=0)
    # other parameters -> the output of a module holding those parameters
    new = {k: v.detach() + 0.05 * torch.randn(v.shape, generator=gen) for k, v in params.items()}
    twin = copy.deepcopy(m)
    twin.load_state_dict(new)
    out = functional_call(m, new, (x,))
    torch.testing.assert_close(out, twin(x), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out, m(x))
    after = _snapshot(m)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    # gradients flow to the params dict, not to the module
    loss = functional_call(m, {k: v.requires_grad_() for k, v in new.items()}, (x,)).pow(2).sum()
    grads = torch.autograd.grad(loss, list(new.values()))
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert all(p.grad is None for p in m.parameters())


def test_task_batchnorm_uses_batch_statistics_in_eval_too(gen):
    m = conv4(in_channels=1, filters=4, image_size=28)
    x = torch.randn(6, 1, 28, 28, generator=gen)
    y_train = m(x)
    m.eval()
    torch.testing.assert_close(m(x), y_train)
    # per-task statistics: the output of an example depends on its batch
    assert not torch.allclose(m(x[:3])[0], m(x)[0])


def test_vmap_over_tasks_equals_loop_and_keeps_tasks_separate(gen):
    m = conv4(in_channels=1, filters=4, image_size=28)
    params = dict(m.named_parameters())
    x = torch.randn(3, 5, 1, 28, 28, generator=gen)  # [tasks, examples, C, H, W]
    batched = vmap(lambda xi: functional_call(m, params, (xi,)))(x)
    looped = torch.stack([m(xi) for xi in x])
    torch.testing.assert_close(batched, looped, rtol=1e-5, atol=1e-5)
    # per-task params under vmap too (MAML's inner loop)
    stacked = {k: v.detach().unsqueeze(0).repeat(3, *[1] * v.ndim) for k, v in params.items()}
    out = vmap(lambda p, xi: functional_call(m, p, (xi,)))(stacked, x)
    torch.testing.assert_close(out, looped, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="flatten them and pass episodes=E"):
        m(x)


def test_per_step_batchnorm(gen):
    m = conv4(in_channels=1, filters=4, image_size=28, bn="per_step", bn_steps=3)
    assert m.norms[0].weight.shape == (3, 4)
    x = torch.randn(4, 1, 28, 28, generator=gen)
    torch.testing.assert_close(m(x, step=0), m(x, step=2))  # identical init
    params = {k: v.detach().clone() for k, v in m.named_parameters()}
    params["norms.0.bias"][2] += 1.0
    out0 = functional_call(m, params, (x,), {"step": 0})
    out2 = functional_call(m, params, (x,), {"step": 2})
    torch.testing.assert_close(out0, m(x, step=0))
    assert not torch.allclose(out0, out2)
    with pytest.raises(ValueError, match=r"step=3 outside 0..2"):
        m(x, step=3)


def test_running_and_none_policies(gen):
    x = torch.randn(4, 1, 28, 28, generator=gen)
    run = conv4(in_channels=1, filters=4, image_size=28, bn="running")
    before = run.norms[0].running_mean.clone()
    run(x)  # impure by design in train mode
    assert not torch.equal(before, run.norms[0].running_mean)
    plain = conv4(in_channels=1, filters=4, image_size=28, bn="none")
    assert len(list(plain.buffers())) == 0 and plain(x).shape == (4, 4)
    assert set(BN_POLICIES) == {"task", "per_step", "running", "none"}


def test_dropblock(gen):
    torch.manual_seed(0)  # DropBlock uses the global RNG like nn.Dropout
    db = DropBlock(block_size=3)
    x = torch.ones(200, 4, 9, 9)
    out = db(x, 0.1)
    dropped = out == 0
    # gamma * (#valid positions) * b^2 ~ fraction dropped (minus overlaps): about 0.1
    frac = float(dropped.float().mean())
    assert 0.06 < frac < 0.12, frac
    # kept activations are rescaled so the mean is preserved
    assert abs(float(out.mean()) - 1.0) < 1e-4
    # dropped regions are unions of 3x3 blocks: no isolated dropped pixel
    pooled = torch.nn.functional.max_pool2d(dropped.float().view(-1, 1, 9, 9), 3, 1, 1)
    assert bool((pooled.view_as(out)[dropped] == 1).all())
    db.eval()
    assert torch.equal(db(x, 0.1), x)
    db.train()
    assert torch.equal(db(x, 0.0), x)
    m = resnet12(variant="cifar", channels=(4, 4, 4, 4))
    m.eval()
    xx = torch.randn(2, 3, 32, 32, generator=gen)
    torch.testing.assert_close(m(xx), m(xx))


def test_factory_errors():
    assert available_backbones() == ["conv4", "conv4-32", "mlp", "resnet12", "resnet12-cifar"]
    assert build_backbone("conv4-32", image_size=84).out_features == 800
    with pytest.raises(ValueError, match="unknown backbone 'vgg'"):
        build_backbone("vgg")
    with pytest.raises(ValueError, match="bn must be one of"):
        conv4(bn="group")
    with pytest.raises(ValueError, match="too small"):
        conv4(image_size=8)
    with pytest.raises(ValueError, match="variant"):
        resnet12(variant="svhn")
    with pytest.raises(ValueError, match=r"MLP expects \[M, 1\]"):
        mlp()(torch.zeros(3))


@pytest.mark.parametrize("bn", ["task", "per_step"])
def test_one_pass_with_episodes_equals_separate_calls(bn):
    from bilevel.models import conv4, resnet12

    g = torch.Generator().manual_seed(0)
    for net, x in ((conv4(1, 8, 28, bn=bn, bn_steps=2), torch.randn(3, 4, 1, 28, 28, generator=g)),
                   (resnet12(3, 32, variant="cifar", channels=(4, 4, 4, 4), drop_rate=0.0, bn=bn, bn_steps=2),
                    torch.randn(3, 4, 3, 32, 32, generator=g))):
        step = 1 if bn == "per_step" else None
        joint = net(x.flatten(0, 1), step=step, episodes=3)
        separate = torch.cat([net(x[j], step=step) for j in range(3)])
        torch.testing.assert_close(joint, separate, rtol=1e-5, atol=1e-5)
        whole = net(x.flatten(0, 1), step=step)  # one set of statistics: different
        assert (whole - separate).abs().max() > 1e-3
        with pytest.raises(ValueError, match="does not divide"):
            net(x.flatten(0, 1), episodes=5)

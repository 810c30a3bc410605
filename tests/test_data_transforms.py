"""Evaluation transforms (PIL -> tensor == sampler tensor) and batched augmentation vs torchvision."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from bilevel.data import Augment, build_transform, load_dataset, normalize, resolve_transform_spec


def test_presets_resolve_to_complete_specs():
    s = resolve_transform_spec({"name": "omniglot", "size": 32})
    assert s == {"name": "omniglot", "kind": "image", "size": [32, 32], "channels": 1,
                 "invert": True, "mean": [0.0], "std": [1.0]}
    m = resolve_transform_spec("mini-imagenet")
    assert m["size"] == [84, 84] and len(m["mean"]) == 3
    assert abs(m["mean"][0] - 120.39586422 / 255) < 1e-12
    assert resolve_transform_spec("sinusoid") == {"name": "sinusoid", "kind": "regression",
                                                  "in_features": 1}
    with pytest.raises(ValueError, match="unknown transform 'jpeg'"):
        resolve_transform_spec({"name": "jpeg"})
    with pytest.raises(ValueError, match=r"unknown keys \['colour'\]"):
        resolve_transform_spec({"name": "omniglot", "colour": 1})
    with pytest.raises(ValueError, match="3 values"):
        resolve_transform_spec({"name": "mini-imagenet", "mean": [0.5]})
    with pytest.raises(ValueError, match="needs 'size'"):
        resolve_transform_spec({"name": "image", "channels": 3})


def test_transform_of_pil_equals_sampler_tensor():
    ds = load_dataset("glyphs", split="test", classes={"test": 3}, examples_per_class=4)
    t = build_transform(ds.transform)
    u8 = ds.images[5]
    # stored glyphs are light-on-dark; a user's image is dark-on-light and gets inverted
    pil = Image.fromarray(255 - u8[0].numpy())
    assert torch.equal(t(pil), normalize(u8, ds.transform))
    # a larger RGB image goes through the same resize as loaded files
    big = Image.fromarray(255 - u8[0].numpy()).resize((105, 105), Image.NEAREST).convert("RGB")
    out = t(big)
    assert out.shape == (1, 28, 28) and out.dtype == torch.float32
    assert float((out - normalize(u8, ds.transform)).abs().mean()) < 0.05


def test_imagenet_transform_standardises():
    t = build_transform("mini-imagenet")
    arr = np.full((84, 84, 3), 255, dtype=np.uint8)
    out = t(Image.fromarray(arr))
    want = (1.0 - 120.39586422 / 255) / (70.68188272 / 255)
    assert out.shape == (3, 84, 84)
    assert abs(float(out[0, 0, 0]) - want) < 1e-5
    reg = build_transform("sinusoid")
    assert torch.equal(reg(2.5), torch.tensor([2.5]))
    with pytest.raises(ValueError, match="expected 1 input value"):
        reg([1.0, 2.0])
    with pytest.raises(TypeError, match="PIL image"):
        t("not an image")


def test_jitter_matches_torchvision_functional(gen):
    from torchvision.transforms.v2 import functional as F

    x = torch.rand(6, 3, 8, 8, generator=gen)
    aug = Augment(brightness=0.4, contrast=0.4, saturation=0.4)
    params = aug.sample_params(6, gen)
    out = aug.apply(x.clone(), params)
    for i in range(6):
        want = F.adjust_brightness(x[i], float(params["brightness"][i]))
        want = F.adjust_contrast(want, float(params["contrast"][i]))
        want = F.adjust_saturation(want, float(params["saturation"][i]))
        torch.testing.assert_close(out[i], want, atol=1e-6, rtol=0)
    assert float(params["brightness"].min()) >= 0.6 and float(params["brightness"].max()) <= 1.4


def test_crop_and_flip_match_definition(gen):
    x = torch.rand(5, 1, 6, 7, generator=gen)
    aug = Augment(crop_padding=2, flip=True)
    p = aug.sample_params(5, gen)
    out = aug.apply(x, p)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(5):
        dy, dx = p["crop"][i].tolist()
        want = padded[i, :, dy:dy + 6, dx:dx + 7]
        if p["flip"][i]:
            want = want.flip(-1)
        assert torch.equal(out[i], want)
    assert int(p["crop"].min()) >= 0 and int(p["crop"].max()) <= 4
    with pytest.raises(ValueError, match="crop_padding"):
        Augment(crop_padding=-1)
    assert Augment.metaoptnet(32).crop_padding == 4 and Augment.metaoptnet(84).crop_padding == 8

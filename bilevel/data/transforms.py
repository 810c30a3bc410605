"""Evaluation-transform specs: one serialisable dict turns a PIL image into the model's input.

A spec is a JSON-like dict. Image specs (``kind = "image"``)::

    {"name": "omniglot", "kind": "image", "size": [28, 28], "channels": 1,
     "invert": True, "mean": [0.0], "std": [1.0]}

Invariant (tested): for every image dataset, ``build_transform(ds.transform)(pil)`` equals the
sampler's tensor for the same example, because both paths use :func:`pil_to_uint8` (decode:
mode conversion -> optional inversion -> LANCZOS resize) and :func:`normalize`
(``(u8 / 255 - mean) / std``). ``invert`` means "input images are dark strokes on a light
background and are stored light-on-dark" (Omniglot convention of MAML, strokes = 1.0).

Regression specs (``kind = "regression"``, e.g. ``{"name": "sinusoid"}``) map a number or array
to a float tensor [in_features].

Presets (mean/std of the ImageNet and CIFAR derivatives are those of the MetaOptNet code):
``omniglot``, ``glyphs``, ``mini-imagenet``, ``tiered-imagenet``, ``cifar-fs``, ``fc100``,
``sinusoid``, plus ``image`` (generic: give ``size`` and ``channels``).
"""
from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "TRANSFORM_PRESETS",
    "EvalTransform",
    "build_transform",
    "example_shape",
    "normalize",
    "pil_to_uint8",
    "resolve_transform_spec",
    "standardize",
    "to_unit",
]

_IMAGENET_MEAN = [v / 255.0 for v in (120.39586422, 115.59361427, 104.54012653)]
_IMAGENET_STD = [v / 255.0 for v in (70.68188272, 68.27635443, 72.54505529)]
_CIFAR_MEAN = [v / 255.0 for v in (129.37731888, 124.10583864, 112.47758569)]
_CIFAR_STD = [v / 255.0 for v in (68.20947949, 65.43124043, 70.45866994)]

_STROKES = {"kind": "image", "size": [28, 28], "channels": 1, "invert": True,
            "mean": [0.0], "std": [1.0]}
_IMAGENET = {"kind": "image", "size": [84, 84], "channels": 3, "invert": False,
             "mean": _IMAGENET_MEAN, "std": _IMAGENET_STD}
_CIFAR = {"kind": "image", "size": [32, 32], "channels": 3, "invert": False,
          "mean": _CIFAR_MEAN, "std": _CIFAR_STD}

TRANSFORM_PRESETS: dict[str, dict[str, Any]] = {
    "omniglot": _STROKES,
    "glyphs": _STROKES,
    "mini-imagenet": _IMAGENET,
    "tiered-imagenet": _IMAGENET,
    "cifar-fs": _CIFAR,
    "fc100": _CIFAR,
    "image": {"kind": "image", "invert": False},
    "sinusoid": {"kind": "regression", "in_features": 1},
}

_IMAGE_KEYS = {"name", "kind", "size", "channels", "invert", "mean", "std"}
_REGRESSION_KEYS = {"name", "kind", "in_features"}


def resolve_transform_spec(spec: Mapping[str, Any] | str) -> dict[str, Any]:
    """Complete and validate a transform spec (preset defaults, then the given keys).

    Args:
        spec: a preset name or a dict with at least ``"name"``; ``size`` may be an int.

    Returns:
        A new self-contained dict (all keys present), safe to store in a model file.
    """
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, Mapping) or "name" not in spec:
        raise ValueError(f"a transform spec is a dict with a 'name' key, got {spec!r}")
    name = str(spec["name"])
    if name not in TRANSFORM_PRESETS:
        raise ValueError(
            f"unknown transform {name!r}; known: {sorted(TRANSFORM_PRESETS)}"
        )
    out: dict[str, Any] = copy.deepcopy(TRANSFORM_PRESETS[name])
    out.update(copy.deepcopy(dict(spec)))
    out["name"] = name
    kind = out["kind"]
    if kind == "regression":
        extra = set(out) - _REGRESSION_KEYS
        if extra:
            raise ValueError(f"unknown keys {sorted(extra)} in regression transform spec {name!r}")
        out["in_features"] = int(out["in_features"])
        return out
    if kind != "image":
        raise ValueError(f"transform kind must be 'image' or 'regression', got {kind!r}")
    extra = set(out) - _IMAGE_KEYS
    if extra:
        raise ValueError(f"unknown keys {sorted(extra)} in image transform spec {name!r}")
    for key in ("size", "channels"):
        if key not in out:
            raise ValueError(f"image transform spec {name!r} needs {key!r}")
    size = out["size"]
    if isinstance(size, int):
        size = [size, size]
    size = [int(s) for s in size]
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"transform 'size' must be an int or [height, width] >= 1, got {out['size']!r}")
    out["size"] = size
    c = int(out["channels"])
    if c not in (1, 3):
        raise ValueError(f"transform 'channels' must be 1 or 3, got {c}")
    out["channels"] = c
    out["invert"] = bool(out.get("invert", False))
    out["mean"] = [float(v) for v in out.get("mean", [0.0] * c)]
    out["std"] = [float(v) for v in out.get("std", [1.0] * c)]
    if len(out["mean"]) != c or len(out["std"]) != c:
        raise ValueError(
            f"transform 'mean'/'std' need {c} values (one per channel), "
            f"got {len(out['mean'])}/{len(out['std'])}"
        )
    if min(out["std"]) <= 0:
        raise ValueError(f"transform 'std' must be positive, got {out['std']}")
    return out


def example_shape(spec: Mapping[str, Any]) -> tuple[int, ...]:
    """Per-example tensor shape produced by the transform: (C, H, W) or (in_features,)."""
    spec = resolve_transform_spec(spec)
    if spec["kind"] == "regression":
        return (spec["in_features"],)
    return (spec["channels"], *spec["size"])


def pil_to_uint8(img: Any, spec: Mapping[str, Any]) -> Tensor:
    """Decode one PIL image into the stored uint8 form [C, H, W] (used at load AND predict time).

    Steps: convert to ``L``/``RGB`` -> invert if ``spec["invert"]`` -> LANCZOS resize to
    ``spec["size"]`` (skipped when already that size).

    Args:
        img: a :class:`PIL.Image.Image` (any mode) or a uint8 array [H, W] / [H, W, C].
        spec: a resolved image spec.

    Returns:
        uint8 tensor [C, H, W].
    """
    from PIL import Image, ImageOps

    if isinstance(img, np.ndarray):
        if img.dtype != np.uint8:
            raise TypeError(f"array images must be uint8 [H, W] or [H, W, C], got {img.dtype}")
        img = Image.fromarray(img)
    if not isinstance(img, Image.Image):
        raise TypeError(f"expected a PIL image or a uint8 array, got {type(img).__name__}")
    c = spec["channels"]
    img = img.convert("L" if c == 1 else "RGB")
    if spec["invert"]:
        img = ImageOps.invert(img)
    h, w = spec["size"]
    if img.size != (w, h):
        img = img.resize((w, h), Image.LANCZOS)
    arr = np.asarray(img, dtype=np.uint8)
    t = torch.from_numpy(arr.copy())
    return t.unsqueeze(0) if c == 1 else t.permute(2, 0, 1).contiguous()


def to_unit(x: Tensor) -> Tensor:
    """uint8 images -> float32 in [0, 1] (``x / 255``); float images are returned unchanged."""
    if x.dtype == torch.uint8:
        return x.to(torch.float32).div_(255.0)
    return x


def standardize(x: Tensor, spec: Mapping[str, Any]) -> Tensor:
    """``(x - mean) / std`` per channel over images [..., C, H, W] (no-op for mean 0, std 1)."""
    mean, std = spec["mean"], spec["std"]
    if all(m == 0.0 for m in mean) and all(s == 1.0 for s in std):
        return x
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    return (x - m) / s


def normalize(x: Tensor, spec: Mapping[str, Any]) -> Tensor:
    """Stored uint8 images [..., C, H, W] -> model input: ``standardize(to_unit(x))``."""
    return standardize(to_unit(x), spec)


class EvalTransform:
    """Callable built from a spec: PIL image (or uint8 array) -> model-input float tensor.

    Image specs return [C, H, W] float32; regression specs return [in_features] float32.
    """

    def __init__(self, spec: Mapping[str, Any]) -> None:
        self.spec = resolve_transform_spec(spec)

    def __repr__(self) -> str:
        return f"EvalTransform({self.spec!r})"

    def __call__(self, x: Any) -> Tensor:
        if self.spec["kind"] == "regression":
            t = torch.as_tensor(x, dtype=torch.float32).reshape(-1)
            if t.numel() != self.spec["in_features"]:
                raise ValueError(
                    f"expected {self.spec['in_features']} input value(s), got {t.numel()}"
                )
            return t
        return normalize(pil_to_uint8(x, self.spec), self.spec)


def build_transform(spec: Mapping[str, Any] | str) -> EvalTransform:
    """The evaluation transform of a spec (see the module docstring).

    Args:
        spec: preset name or spec dict, e.g. ``{"name": "omniglot", "size": 28}``.

    Returns:
        An :class:`EvalTransform` (PIL image -> tensor [C, H, W]).
    """
    return EvalTransform(spec)
